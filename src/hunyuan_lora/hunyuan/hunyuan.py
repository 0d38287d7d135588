"""HunYuanModel and HunYuanMoEV1ForCausalLM, the classes named by a Hunyuan-A13B folder's `auto_map`.

The project's own implementation. Copied into a model folder it loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; imported from the package
it loads the same checkpoint (same state-dict keys).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_hunyuan import HunYuanConfig
from .modeling_hunyuan import (
    HunYuanDecoderLayer,
    HunYuanRMSNorm,
    HunYuanRotaryEmbedding,
    attention_mask_4d,
    static_attention_mask,
)

logger = logging.get_logger(__name__)

# The tied lm_head multiplies with a copy of its weight padded to a multiple of this many rows
# (vocabulary 128,167 -> 128,192) and slices the logits back: 128,167 is not a multiple of 8, which
# sends cuBLAS to its slow align-1 kernels (H200: 290 ms of a 460 ms step at 16K tokens; 33.8 % ->
# 35.5 % MFU, bench/results/NVIDIA-H200-2026-11-28-v4.md "fast-padlm").
LM_HEAD_PAD_MULTIPLE = 64


class _PaddedWeightCache:
    """One zero-padded copy of the lm_head weight, valid while that weight is unchanged.

    Never saved, pickled or deep-copied (a copy of the model rebuilds its own); not a buffer, so the
    state-dict keys and shapes are those of the checkpoint.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.ref, self.key, self.padded = None, None, None

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        # _version counts in-place writes (copy_, load_state_dict, a merge); data_ptr/device/dtype catch
        # `.to()`, `.data = ...`, a new tensor. Writes through `.data` bypass _version: call clear() after.
        return (weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape))

    def get(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        key = self._key(weight) + (rows,)
        if self.padded is not None and self.ref() is weight and self.key == key:
            return self.padded
        self.clear()  # free the stale copy before allocating the new one
        with torch.no_grad():
            padded = weight.new_zeros(rows, weight.shape[1])
            padded[: weight.shape[0]].copy_(weight)
        self.ref, self.key, self.padded = weakref.ref(weight), key, padded
        return padded

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.clear()

    def __deepcopy__(self, memo):
        return _PaddedWeightCache()


def padded_lm_logits(
    hidden_states: torch.Tensor, weight: torch.Tensor, multiple: int, cache: _PaddedWeightCache | None
) -> torch.Tensor:
    """hidden_states @ weight.T computed with `weight` zero-padded to a multiple of `multiple` rows.

    The extra logits are exactly the products with zero rows and are sliced off, so the result equals
    F.linear(hidden_states, weight) (same values; a (..., V) view of a (..., V_pad) tensor). A frozen
    weight uses `cache`; a trainable one is padded inside autograd on every call (right gradients).
    """
    vocab = weight.shape[0]
    rows = -(-vocab // multiple) * multiple
    if weight.requires_grad or cache is None:
        padded = F.pad(weight, (0, 0, 0, rows - vocab))
    else:
        padded = cache.get(weight, rows)
    return F.linear(hidden_states, padded)[..., :vocab]


def _decode_graphs():
    """The package's decode_graphs module; None in a model folder's copy of this file (it decodes eagerly)."""
    try:
        from hunyuan_lora.hunyuan import decode_graphs
    except ImportError:
        return None
    return decode_graphs


class _GraphsHolder:
    """The model's DecodeGraphs (made on first use), never saved, pickled or deep-copied (a copy captures its own)."""

    def __init__(self):
        self._graphs = None

    @property
    def graphs(self):
        if self._graphs is None:
            self._graphs = _decode_graphs().DecodeGraphs()
        return self._graphs

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __deepcopy__(self, memo):
        return _GraphsHolder()


class HunYuanPreTrainedModel(PreTrainedModel):
    config_class = HunYuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HunYuanDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _keep_in_fp32_modules = ["wg"]  # the router
    _supports_sdpa = True
    _supports_cache_class = True
    _supports_static_cache = True  # generate(cache_implementation="static"); decode steps then run as CUDA graphs

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class HunYuanModel(HunYuanPreTrainedModel):
    def __init__(self, config: HunYuanConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HunYuanDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HunYuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HunYuanRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def _prepare_4d_causal_attention_mask_with_cache_position(
        self, attention_mask, sequence_length, target_length, cache_position, batch_size, **kwargs
    ):
        """generate's hook for a StaticCache: the (B, 1, T, cache length) mask, a fixed shape per cache."""
        return static_attention_mask(attention_mask, cache_position, target_length, batch_size)

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."
            )
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.training and not inputs_embeds.requires_grad:
            # Reentrant checkpointing needs an input that requires grad when the embeddings are frozen.
            inputs_embeds.requires_grad_(True)
        B, T = inputs_embeds.shape[:2]

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        elif use_cache and not isinstance(past_key_values, Cache):
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        # a cache of fixed length (StaticCache): masks over all its positions, built without host synchronisation
        fixed_length = past_key_values.get_max_cache_shape() if use_cache else None
        if fixed_length is None or cache_position is None:  # a StaticCache's length is a device tensor (a sync)
            past_len = int(past_key_values.get_seq_length()) if use_cache else 0
        if cache_position is None:
            cache_position = torch.arange(past_len, past_len + T, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, -1)
        if fixed_length is not None:
            mask = static_attention_mask(attention_mask, cache_position, fixed_length, B)
        else:
            mask = attention_mask_4d(attention_mask, position_ids, T, past_len, without_sync=self.training)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, cos, sin, mask, None, cache_position
                )
            else:
                cache = past_key_values if use_cache else None
                hidden_states = layer(hidden_states, cos, sin, mask, cache, cache_position)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )


class HunYuanMoEV1ForCausalLM(HunYuanPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]
    # lm_head with a padded weight (see LM_HEAD_PAD_MULTIPLE). None: automatic, only where it pays
    # (training, lm_head weight on CUDA and frozen: +1 GB for the copy on the real model);
    # True / False: force on / off (the CPU tests force it on).
    pad_lm_head: bool | None = None

    def __init__(self, config: HunYuanConfig):
        super().__init__(config)
        self.model = HunYuanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._lm_head_cache = _PaddedWeightCache()
        self._decode_graphs = _GraphsHolder()
        self.post_init()

    def prefer_static_decode(self) -> None:
        """generate decodes through a StaticCache, each step a replayed CUDA graph (decode_graphs.py), not
        transformers' automatic torch.compile of a static-cache forward."""
        self.generation_config.cache_implementation = "static"
        self.generation_config.disable_compile = True

    def reset_decode_graphs(self) -> None:
        """Drop the captured decode steps (needed only after writing weights through `.data`)."""
        if self._decode_graphs._graphs is not None:
            self._decode_graphs._graphs.reset()

    def decode_logits(self, input_ids, attention_mask, position_ids, cache_position, past_key_values) -> torch.Tensor:
        """Logits of one forward through the cache: what a decode graph captures."""
        hidden_states = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
            cache_position=cache_position,
        ).last_hidden_state
        return self.lm_logits(hidden_states)

    def _graphable(
        self,
        input_ids,
        attention_mask,
        position_ids,
        past_key_values,
        cache_position,
        inputs_embeds,
        labels,
        output_hidden_states,
    ) -> bool:
        """A decode step generate makes with a StaticCache on CUDA, outside training: replay a CUDA graph."""
        return (
            isinstance(past_key_values, StaticCache)
            and input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and input_ids.is_cuda
            and inputs_embeds is None
            and labels is None
            and not output_hidden_states
            and not self.training
            and not torch.is_grad_enabled()
            and attention_mask is not None
            and attention_mask.dim() == 4
            and position_ids is not None
            and cache_position is not None
            and _decode_graphs() is not None
            and _decode_graphs().enabled()
        )

    def reset_lm_head_cache(self) -> None:
        """Drop the padded lm_head copy (needed only after writing the weight through `.data`)."""
        self._lm_head_cache.clear()

    def lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        weight = getattr(head, "weight", None)
        plain = (
            type(head) is nn.Linear
            and head.bias is None
            and not head._forward_hooks
            and not head._forward_pre_hooks
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.is_floating_point()
            and weight.shape[0] % LM_HEAD_PAD_MULTIPLE != 0
        )
        use = self.pad_lm_head
        if use is None:
            use = (
                self.training
                and weight is not None
                and weight.device.type == "cuda"
                and not weight.requires_grad
                and not hasattr(weight, "ds_id")
            )  # ds_id: ZeRO-3 shard
        if not (use and plain):
            if weight is None or weight.requires_grad:
                self._lm_head_cache.clear()
            return head(hidden_states)
        if hasattr(head, "_hf_hook"):  # accelerate's device_map hook would have moved the input
            hidden_states = hidden_states.to(weight.device)
        return padded_lm_logits(hidden_states, weight, LM_HEAD_PAD_MULTIPLE, self._lm_head_cache)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings
        self.reset_lm_head_cache()

    def set_decoder(self, decoder):
        self.model = decoder

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if self._graphable(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            cache_position,
            inputs_embeds,
            labels,
            output_hidden_states,
        ):
            logits = self._decode_graphs.graphs.step(
                self, past_key_values, input_ids, position_ids, cache_position, attention_mask
            )
            # a copy: the graph's output is overwritten by the next step
            return CausalLMOutputWithPast(logits=logits.clone(), past_key_values=past_key_values)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_logits(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            # Shifts labels and divides by num_items_in_batch (passed by Trainer) under grad accumulation.
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
