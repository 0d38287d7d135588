"""The real Hunyuan-A13B-Instruct architecture, beside the code that builds it: what the probe and
bench/ build when no model folder is at hand, and what the stand-in shrinks (same keys, tiny values)."""


def real_config() -> dict:
    """config.json of Hunyuan-A13B-Instruct (the values that define the architecture)."""
    layers = 32
    return {
        "architectures": ["HunYuanMoEV1ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_hunyuan.HunYuanConfig",
            "AutoModel": "hunyuan.HunYuanModel",
            "AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM",
        },
        "model_type": "hunyuan",
        "hidden_size": 4096,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "attention_head_dim": 128,
        "attention_bias": False,
        "attention_dropout": 0.1,
        "intermediate_size": 3072,
        "num_experts": 64,
        "moe_topk": [8] * layers,
        "num_shared_expert": [1] * layers,
        "moe_intermediate_size": [3072] * layers,
        "use_mixed_mlp_moe": True,
        "norm_topk_prob": True,
        "moe_drop_tokens": False,
        "hidden_act": "silu",
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "use_qk_norm": True,
        "use_cla": False,
        "cla_share_factor": 2,
        "use_mla": False,
        "vocab_size": 128167,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "dynamic",
            "alpha": 1000.0,
            "factor": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 127960,
        "pad_token_id": 127961,
        "eod_token_id": 127967,
        "sep_token_id": 127962,
    }
