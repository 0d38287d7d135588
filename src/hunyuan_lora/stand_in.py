"""The stand-in model: a tiny, seeded, random Hunyuan-A13B folder laid out like the real download.

    make stand-in                       # artifacts/stand-in/
    python -m hunyuan_lora.stand_in OUT_DIR [--seed 0]

Same files, config keys, auto_map, module names, state-dict key pattern, special-token layout and
chat template as Tencent's folder, so every stage (patch, dataset, train, infer, merge, download)
runs for real on it in CI. Everything in it is the project's own: the model code is copied from
`hunyuan_lora/hunyuan/`, the BPE ranks are trained here on the project's sample dataset.
Same seed -> byte-identical folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from collections import Counter
from pathlib import Path

import regex
import torch
from safetensors.torch import save_file

from .atomic import staging_dir
from .errors import UserError, exit_on_user_error
from .hunyuan.a13b import real_config
from .hunyuan.configuration_hunyuan import HunYuanConfig
from .hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from .hunyuan.tokenization_hy import PAT_STR, SPECIAL_TOKENS

PACKAGE_DIR = Path(__file__).parent
CODE_DIR = PACKAGE_DIR / "hunyuan"
MODEL_CODE_FILES = ["configuration_hunyuan.py", "hunyuan.py", "modeling_hunyuan.py", "tokenization_hy.py"]
SAMPLE_DATASET = PACKAGE_DIR / "assets" / "zhenhuan_sample.json"
BPE_SIZE = 814  # 256 byte tokens + 558 merges; + 210 special tokens = a vocabulary of 1,024
# Marks a folder as written here: only such a folder (or an empty one) is ever replaced.
MARKER = "stand_in.json"
LOGGER_DEFINITION = "logger = logging.get_logger(__name__)\n"

# The chat template, written from the documented rendering rules:
#   system + first user  <|startoftext|>{system}<|extra_4|>{user}<|extra_0|>
#   any other user turn   <|startoftext|>{user}<|extra_0|>
#   assistant turn        {content}<|eos|>
#   thinking off          '<think>\n\n</think>\n' once, at the very end (add_generation_prompt is ignored)
# Thinking is on by default; enable_thinking=false, or a last user message starting with
# /no_think, turns it off; /think turns it back on.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=none, first=true, think=true) -%}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{%- set ns.think = false -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if message['content'].startswith('/no_think') -%}{%- set ns.think = false -%}"
    "{%- elif message['content'].startswith('/think') -%}{%- set ns.think = true -%}{%- endif -%}"
    "{{- '<|startoftext|>' -}}"
    "{%- if ns.first and ns.system is not none -%}{{- ns.system + '<|extra_4|>' -}}{%- endif -%}"
    "{{- message['content'] + '<|extra_0|>' -}}"
    "{%- set ns.first = false -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + '<|eos|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not ns.think -%}{{- '<think>\\n\\n</think>\\n' -}}{%- endif -%}"
)


def special_token_ids(first_special: int) -> dict[str, int]:
    return {tok: first_special + i for i, tok in enumerate(SPECIAL_TOKENS)}


def stand_in_config() -> dict:
    """The real config's keys with tiny values; special ids keep their place at the top of the vocab."""
    layers = 2
    ids = special_token_ids(BPE_SIZE)
    cfg = real_config()
    cfg.update(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_head_dim=16,
        intermediate_size=48,
        num_experts=8,
        moe_topk=[2] * layers,
        num_shared_expert=[1] * layers,
        moe_intermediate_size=[48] * layers,
        vocab_size=BPE_SIZE + len(SPECIAL_TOKENS),
        max_position_embeddings=4096,
        eos_token_id=ids["<|eos|>"],
        pad_token_id=ids["<|pad|>"],
        eod_token_id=ids["<|extra_5|>"],
        sep_token_id=ids["<|extra_0|>"],
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_corpus() -> str:
    """Text the BPE ranks are trained on: the sample dataset and the chat-format strings."""
    records = json.loads(SAMPLE_DATASET.read_text(encoding="utf-8"))
    lines = [r["instruction"] + "\n" + r["output"] for r in records]
    lines += ["<think>\n\n</think>\n<answer>\n", "\n</answer>", "现在你要扮演皇帝身边的女人--甄嬛"]
    return "\n".join(lines)


def train_bpe(text: str, size: int) -> dict[bytes, int]:
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair.

    Ties break on the pair's bytes, so the ranks are a pure function of the text.
    """
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(regex.findall(PAT_STR, text))
    seqs: dict[tuple[bytes, ...], int] = {tuple(bytes([b]) for b in w.encode()): n for w, n in words.items()}
    while len(ranks) < size:
        pairs: Counter = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += n
        if not pairs:
            raise ValueError(f"the corpus supports only {len(ranks)} tokens, {size} requested")
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        ranks.setdefault(a + b, len(ranks))
        seqs = {_merge(seq, a, b): n for seq, n in seqs.items()}
    return ranks


def _merge(seq: tuple[bytes, ...], a: bytes, b: bytes) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def write_tokenizer(out: Path) -> None:
    ranks = train_bpe(tokenizer_corpus(), BPE_SIZE)
    with open(out / "hy.tiktoken", "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")
    ids = special_token_ids(BPE_SIZE)
    _write_json(
        out / "tokenizer_config.json",
        {
            "auto_map": {"AutoTokenizer": ["tokenization_hy.HYTokenizer", None]},
            "tokenizer_class": "HYTokenizer",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "model_max_length": 32768,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": tok,
                    "special": True,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                }
                for tok, i in ids.items()
            },
            "chat_template": CHAT_TEMPLATE,
        },
    )


# ---------------------------------------------------------------------------------------------
# weights


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**config))
    # A trained model's logits span several nats. With the init std of 0.02, the tied 64-wide
    # embedding gives near-uniform logits that LoRA (which leaves the embedding frozen) cannot
    # sharpen, and the demo's loss would hardly move.
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.1)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied to model.embed_tokens.weight, not stored (like the real files)
            continue
        dtype = torch.float32 if key.endswith("mlp.gate.wg.weight") else torch.bfloat16
        state[key] = tensor.detach().to(dtype).contiguous()
    return state


def write_weights(out: Path, config: dict, seed: int) -> None:
    """Two shards + index, split like the real 4-shard layout (by layer)."""
    state = random_state_dict(config, seed)
    last = config["num_hidden_layers"] - 1
    shard_of = {key: 2 if key.startswith(f"model.layers.{last}.") or key == "model.norm.weight" else 1 for key in state}
    names = {n: f"model-{n:05d}-of-00002.safetensors" for n in (1, 2)}
    for n, name in names.items():
        save_file({k: v for k, v in state.items() if shard_of[k] == n}, str(out / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(
        out / "model.safetensors.index.json",
        {
            "metadata": {"total_size": total},
            "weight_map": {k: names[shard_of[k]] for k in sorted(state)},
        },
    )


# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_model_code(out: Path) -> None:
    for name in MODEL_CODE_FILES:
        text = (CODE_DIR / name).read_text(encoding="utf-8")
        if name == "hunyuan.py":
            # Reproduce the defect of Tencent's hunyuan.py: HunYuanModel.forward calls
            # logger.warning_once(...) under gradient checkpointing + training + use_cache, but the
            # file never defines `logger`. The patch stage must find and fix exactly this.
            if text.count(LOGGER_DEFINITION) != 1:
                raise RuntimeError(f"expected one '{LOGGER_DEFINITION.strip()}' in {CODE_DIR / name}")
            text = text.replace(LOGGER_DEFINITION, "")
        (out / name).write_text(text, encoding="utf-8")


def refuse_foreign(out: Path) -> None:
    """Only an empty folder or a stand-in this module wrote (it carries MARKER) may be replaced:
    STAND_IN_DIR pointed at a user's folder must never cost them a file."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise UserError(
            f"{out} exists and is not a folder",
            where="STAND_IN_DIR",
            fix="name a new or empty folder for the stand-in, e.g. STAND_IN_DIR=artifacts/stand-in",
        )
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(
            f"{out} is a non-empty folder that `make stand-in` did not write (no {MARKER} in it); "
            "nothing in it was changed",
            where="STAND_IN_DIR",
            fix="name a new or empty folder, e.g. STAND_IN_DIR=artifacts/stand-in, or empty this one "
            "yourself if it is a stand-in from an older version",
        )


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the stand-in folder to out_dir (replacing an earlier stand-in) and return its path."""
    out = Path(out_dir)
    refuse_foreign(out)
    with staging_dir(out, marker=MARKER) as tmp:  # readers never see a half-written folder
        _write_folder(tmp, seed)
        (tmp / MARKER).write_text(json.dumps({"written_by": "hunyuan_lora.stand_in", "seed": seed}) + "\n")
    return out


def _write_folder(tmp: Path, seed: int) -> None:
    config = stand_in_config()
    copy_model_code(tmp)
    _write_json(tmp / "config.json", config)
    _write_json(
        tmp / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": [config["eos_token_id"], config["eod_token_id"]],
            "pad_token_id": config["pad_token_id"],
            "do_sample": True,
            "top_k": 20,
            "top_p": 0.8,
            "repetition_penalty": 1.05,
            "temperature": 0.7,
        },
    )
    write_tokenizer(tmp)
    write_weights(tmp, config, seed)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # make stand-in / make demo hand STAND_IN_DIR over as HL_STAND_IN_DIR (exactly as typed)
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("HL_STAND_IN_DIR") or "artifacts/stand-in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
