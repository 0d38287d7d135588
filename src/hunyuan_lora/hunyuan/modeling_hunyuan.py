"""Building blocks of the Hunyuan-A13B decoder layer: norms, rotary, attention, MLP, router, MoE.

The project's own implementation, written from the published architecture (see the README's
"Model facts"). Module and parameter names match the released checkpoint, so its state dict
loads here unchanged and LoRA `target_modules` match the same names:

    model.layers.N.self_attn.{q,k,v,o}_proj, .query_layernorm, .key_layernorm
    model.layers.N.mlp.gate.wg                      router, float32
    model.layers.N.mlp.shared_mlp.{gate,up,down}_proj
    model.layers.N.mlp.experts.{i}.{gate,up,down}_proj

Shapes in comments: B batch, T query tokens, S key tokens, H hidden, nh / nkv heads, hd head dim,
N = B*T tokens, E experts, k experts per token.

The MoE block runs `config.moe_impl`: "upstream" (default; each expert module in turn, self-contained)
or "fast" (grouped products; attention's q/k/v and the shared expert's gate/up then run as one product
each too, fast_linear.py), which needs the installed hunyuan_lora package: a model folder's copy of
this file raises an ImportError saying so if asked for "fast" without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_hunyuan import HunYuanConfig

MOE_IMPLS = ("upstream", "fast")


def _fast(name: str):
    """The fast path lives in the installed hunyuan_lora package, not in a model folder."""
    try:
        from hunyuan_lora.hunyuan import fast_linear, fast_moe
    except ImportError as e:
        raise ImportError(
            "config.moe_impl='fast' needs the hunyuan_lora package installed (its fast_moe.py is "
            "not part of a model folder); without it use moe_impl='upstream'"
        ) from e
    return getattr(fast_moe, name, None) or getattr(fast_linear, name)


class HunYuanRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """weight * (x normalised in float32, rounded to x's dtype): torch's fused RMSNorm, one kernel each way on
        CUDA where the float32 formula spelled out is ~20 (four norms a layer, three passes a training step).
        Autocast is off inside so it keeps x's dtype, as the spelled-out formula does."""
        with torch.autocast(hidden_states.device.type, enabled=False):
            normed = F.rms_norm(hidden_states, hidden_states.shape[-1:], None, self.variance_epsilon)
        return self.weight * normed


class HunYuanRotaryEmbedding(nn.Module):
    """Rotary embedding with the dynamic NTK-alpha base: theta * alpha ** (hd / (hd - 2))."""

    def __init__(self, config: HunYuanConfig):
        super().__init__()
        dim = config.attention_head_dim
        base = config.rope_theta
        scaling = config.rope_scaling or {}
        if scaling.get("type") == "dynamic" and scaling.get("alpha"):
            base = base * scaling["alpha"] ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 angles whatever the model dtype: bf16 positions lose precision past 256.
        freqs = position_ids[:, :, None].float() * self.inv_freq.float().to(x.device)[None, None, :]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class HunYuanAttention(nn.Module):
    """Grouped-query attention; q and k are RMS-normalised per head AFTER the rotary embedding."""

    def __init__(self, config: HunYuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        # "fast": q/k/v as one product, as o (the package's fast_linear.py); same parameters
        self.fast_linears = getattr(config, "moe_impl", "upstream") == "fast"
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.query_layernorm = HunYuanRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = HunYuanRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_value=None, cache_position=None):
        B, T, _ = hidden_states.shape
        if self.fast_linears:
            q, k, v = _fast("linears_fast")(self, ("q_proj", "k_proj", "v_proj"), hidden_states)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx, {"cache_position": cache_position})
        groups = self.num_heads // self.num_kv_heads
        if T == 1 and not (self.training and self.attention_dropout):
            out = decode_attention(q, k, v, attention_mask)  # one query: no copy of the cache per head
            return self._output(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,  # (B, 1, T, S) bool, or None for plain causal
            dropout_p=self.attention_dropout if self.training else 0.0,  # the real model trains with it
            is_causal=attention_mask is None and T > 1,
        )
        return self._output(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        if self.fast_linears:
            return _fast("linears_fast")(self, ("o_proj",), out)[0]
        return self.o_proj(out)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row: q (B, nh, 1, hd), k / v (B, nkv, S, hd), mask (B, 1, 1, S) bool or None.

    Each key/value head serves its group of query heads as one (groups, hd) x (hd, S) product, so the cache
    is read once, not copied per query head as repeat_interleave does; softmax in float32.
    """
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd)  # query head h uses key/value head h // groups
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * hd**-0.5  # (B, nkv, groups, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, nh, 1, hd)


class HunYuanMLP(nn.Module):
    """SiLU-gated MLP: the shared expert and each routed expert."""

    def __init__(self, config: HunYuanConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fast_linears = getattr(config, "moe_impl", "upstream") == "fast"  # gate/up as one product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_linears:
            linears = _fast("linears_fast")
            gate, up = linears(self, ("gate_proj", "up_proj"), x)
            return linears(self, ("down_proj",), self.act_fn(gate) * up)[0]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HunYuanTopKGate(nn.Module):
    """The router: float32 logits -> softmax over E experts -> top-k -> renormalise to sum 1."""

    def __init__(self, config: HunYuanConfig, layer_idx: int):
        super().__init__()
        self.top_k = config.layer_value("moe_topk", layer_idx)
        self.norm_topk_prob = config.norm_topk_prob
        # float32 even when the model is bf16: routing decisions are sensitive to rounding.
        self.wg = nn.Linear(config.hidden_size, config.num_experts, bias=False, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32 (float64 in tests)
        # Under Trainer(bf16=True) autocast would run this Linear in bf16 whatever its inputs are.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.wg.weight.to(dtype))  # (N, E)
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k) float32, (N, k) int64
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts


class HunYuanMoE(nn.Module):
    """Shared MLP + k of E routed experts per token, dropless.

    Upstream dispatch has a capacity of max(k, k*N/E) pairs per expert and silently drops the
    rest; here every (token, expert) pair is computed, as in the native transformers >= 4.56
    implementation.
    """

    def __init__(self, config: HunYuanConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = HunYuanTopKGate(config, layer_idx)
        if config.use_mixed_mlp_moe:
            shared = config.intermediate_size * config.layer_value("num_shared_expert", layer_idx)
            self.shared_mlp = HunYuanMLP(config, shared)
        else:
            self.shared_mlp = None
        expert_size = config.layer_value("moe_intermediate_size", layer_idx)
        self.experts = nn.ModuleList(HunYuanMLP(config, expert_size) for _ in range(self.num_experts))
        for expert in self.experts:  # "fast" groups them (fast_moe.py); the loop calls the modules as they are
            expert.fast_linears = False
        # "upstream": routed_experts below, each expert module called in turn as the model folder's
        # code does; "fast": grouped products over the same parameters (the package's fast_moe.py)
        self.moe_impl = getattr(config, "moe_impl", "upstream")
        # set by transformers' gradient_checkpointing_enable/disable: under it "fast" keeps the recompute's
        # dequantised expert weights for the layer's backward
        self.gradient_checkpointing = False
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"config.moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        weights, experts = self.gate(x)
        if self.moe_impl == "fast":
            out = _fast("routed_experts_fast")(self, x, weights, experts)
        else:
            out = self.routed_experts(x, weights, experts)
        if self.shared_mlp is not None:
            out = self.shared_mlp(x) + out
        return out.view(shape)

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_j weights[:, j] * expert_{experts[:, j]}(x), looping only over experts that got tokens."""
        k = experts.shape[1]
        flat = experts.reshape(-1)  # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of_pair = order // k
        weight_of_pair = weights.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                tokens = token_of_pair[start : start + n]
                y = expert(x[tokens]) * weight_of_pair[start : start + n, None]  # (n, H)
                out.index_add_(0, tokens, y)
            start += n
        return out


class HunYuanDecoderLayer(nn.Module):
    def __init__(self, config: HunYuanConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = HunYuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = HunYuanAttention(config, layer_idx)
        self.post_attention_layernorm = HunYuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.num_experts > 1:
            self.mlp = HunYuanMoE(config, layer_idx)
        else:
            self.mlp = HunYuanMLP(config, config.intermediate_size)

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_value=None, cache_position=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, past_key_value, cache_position
        )
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


def static_attention_mask(
    attention_mask: torch.Tensor | None, cache_position: torch.Tensor, length: int, batch: int
) -> torch.Tensor:
    """Boolean (B, 1, T, length) mask over a cache of fixed length: query t sees the keys at positions up to
    cache_position[t] that the 2-D attention_mask (B, <= length) does not mark as padding. Built from
    tensors only (no host synchronisation), so a CUDA graph can capture it."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    keys = torch.arange(length, device=cache_position.device)
    mask = (keys[None, :] <= cache_position[:, None])[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        real = F.pad(attention_mask.bool(), (0, length - attention_mask.shape[-1]))  # not yet written: masked anyway
        mask = mask & real[:, None, None, :]
    mask = mask.expand(batch, 1, -1, -1)
    return mask | ~mask.any(dim=-1, keepdim=True)  # a left-pad query row: see everything rather than NaN


def attention_mask_4d(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    q_len: int,
    past_len: int,
    without_sync: bool = False,
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask: causal, padding and packed-sample boundaries; None = plain causal.

    Packed samples are recognised by position ids that restart at 0 inside a row; each sample then
    attends only to itself. A 4-D mask is taken as already built. Whether the rows are packed or padded is
    read on the host, which waits for the GPU; without_sync (training) builds the mask for both instead, so
    the host queues the step's kernels while the GPU still runs the previous step's.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if without_sync and q_len > 1 and past_len == 0:
        packed, padded = True, attention_mask is not None
    else:
        packed = q_len > 1 and past_len == 0 and bool((position_ids[:, 1:] == 0).any())
        padded = attention_mask is not None and not bool(attention_mask.all())
    if not packed and not padded and (past_len == 0 or q_len == 1):
        return None
    device = position_ids.device
    S = past_len + q_len
    query_pos = torch.arange(past_len, S, device=device)
    mask = (torch.arange(S, device=device)[None, :] <= query_pos[:, None])[None, None]  # (1, 1, T, S)
    if padded:
        mask = mask & attention_mask[:, None, None, :S].bool()
    if packed:
        sample = (position_ids == 0).cumsum(-1)  # (B, T) sample number of each token
        mask = mask & (sample[:, None, :, None] == sample[:, None, None, :])
    # A query row with nothing to attend to (a left-pad token) would give NaN: let it see everything.
    return mask | ~mask.any(dim=-1, keepdim=True)
