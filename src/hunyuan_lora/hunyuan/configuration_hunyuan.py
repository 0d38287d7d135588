"""HunYuanConfig: the config class named by `auto_map.AutoConfig` of a Hunyuan-A13B model folder.

The project's own implementation, written from the published config keys. Loaded by
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` when this file is copied into a
model folder, and importable as `hunyuan_lora.hunyuan.configuration_hunyuan`.
"""

from transformers.configuration_utils import PretrainedConfig


class HunYuanConfig(PretrainedConfig):
    model_type = "hunyuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=128167,
        hidden_size=4096,
        intermediate_size=3072,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        attention_head_dim=128,
        attention_bias=False,
        attention_dropout=0.1,
        hidden_act="silu",
        mlp_bias=False,
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        pad_token_id=127961,
        bos_token_id=1,
        eos_token_id=127960,
        eod_token_id=127967,
        sep_token_id=127962,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_scaling=None,
        num_experts=64,
        moe_topk=8,
        num_shared_expert=1,
        moe_intermediate_size=3072,
        use_mixed_mlp_moe=True,
        norm_topk_prob=True,
        moe_drop_tokens=False,
        use_qk_norm=True,
        use_cla=False,
        cla_share_factor=2,
        use_mla=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.attention_head_dim = attention_head_dim
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.eod_token_id = eod_token_id
        self.sep_token_id = sep_token_id
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        # Per-layer lists in the real config; a scalar means the same for every layer.
        self.num_experts = num_experts
        self.moe_topk = moe_topk
        self.num_shared_expert = num_shared_expert
        self.moe_intermediate_size = moe_intermediate_size
        self.use_mixed_mlp_moe = use_mixed_mlp_moe
        self.norm_topk_prob = norm_topk_prob
        self.moe_drop_tokens = moe_drop_tokens
        self.use_qk_norm = use_qk_norm
        self.use_cla = use_cla
        self.cla_share_factor = cla_share_factor
        self.use_mla = use_mla
        if use_cla or use_mla:
            raise ValueError("use_cla / use_mla are not used by Hunyuan-A13B and not implemented here")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def layer_value(self, name: str, layer_idx: int):
        """The value of a per-layer setting (the real config stores lists of num_hidden_layers)."""
        value = getattr(self, name)
        return value[layer_idx] if isinstance(value, (list, tuple)) else value
