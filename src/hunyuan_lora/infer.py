"""Stage 5, infer: answer prompts with the base model + the trained LoRA adapter.

    make infer PROMPT="你是谁？"                          # one prompt
    make infer SET="infer.input_jsonl=q.jsonl"            # batch: {"instruction": ...} per line

Prompts go through the tokenizer's chat template with thinking off (infer.thinking switches it),
with the model folder's generation_config.json. The answer is the <answer>...</answer> content when
the model writes one, else the text after </think>, else the whole text: never an IndexError.
Writes <output_dir>/infer/answers.jsonl (or infer.output_jsonl) and prints each answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .atomic import write_text
from .config import Config
from .errors import UserError
from .train import load_base_model, pick_device, pick_dtype

ANSWER = re.compile(r"<answer>\s*(.*?)\s*(?:</answer>|$)", re.S)


def extract_answer(text: str) -> str:
    """<answer> content if present (closed or not), else what follows </think>, else the text."""
    match = ANSWER.search(text)
    if match:
        return match.group(1).strip()
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return text.strip()


def adapter_dir(cfg: Config) -> Path:
    path = Path(cfg.infer.adapter) if cfg.infer.adapter else cfg.output_dir / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"no LoRA adapter in {path}", where="infer.adapter",
                        fix="run `make train` with the same CONFIG / OUTPUT_DIR, or set infer.adapter")
    return path


def load_with_adapter(cfg: Config, path: Path):
    """Base model + adapter; fails loudly if any adapter tensor did not land in the model."""
    from peft import PeftModel
    from safetensors import safe_open

    device = pick_device(cfg)
    model = load_base_model(cfg, device, pick_dtype(cfg, device))
    model = PeftModel.from_pretrained(model, str(path))
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    # PEFT's saved keys drop the adapter name: ...lora_A.weight <-> ...lora_A.default.weight
    loaded = {n.replace(".default", "") for n, _ in model.named_parameters() if "lora_" in n}
    missing = saved - loaded
    if missing or not saved:
        raise UserError(f"{len(missing)} of {len(saved)} adapter tensors match no module of the model, "
                        f"e.g. {sorted(missing)[:2]}", where=str(path),
                        fix="use the adapter trained on this model folder (same architecture and targets)")
    model.eval()
    return model


def read_prompts(cfg: Config) -> list[dict]:
    if not cfg.infer.input_jsonl:
        return [{"instruction": p} for p in cfg.infer.prompts]
    path = Path(cfg.infer.input_jsonl)
    if not path.is_file():
        raise UserError(f"{path} does not exist", where="infer.input_jsonl", fix="give a JSONL file of prompts")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"not JSON ({e.msg})", where=f"{path}:{n}", fix='one {"instruction": "..."} per line') from e
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise UserError("each line needs a string field 'instruction'", where=f"{path}:{n}",
                            fix='write {"instruction": "your question"}')
        rows.append(row)
    return rows


def generate(model, tokenizer, cfg: Config, instruction: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction}
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=cfg.infer.thinking,
                                        return_tensors="pt").to(model.device)
    kwargs = {"max_new_tokens": cfg.infer.max_new_tokens}
    if cfg.infer.do_sample is not None:
        kwargs["do_sample"] = cfg.infer.do_sample
    if cfg.infer.do_sample is False:  # greedy: the folder's sampling settings do not apply
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(cfg: Config) -> Path:
    from transformers import AutoTokenizer

    path = adapter_dir(cfg)
    rows = read_prompts(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.dir, trust_remote_code=True)
    model = load_with_adapter(cfg, path)
    results = []
    for row in rows:
        system = row.get("system", cfg.data.system_prompt)
        text = generate(model, tokenizer, cfg, row["instruction"], system)
        answer = extract_answer(text)
        results.append({"instruction": row["instruction"], "answer": answer, "raw": text})
        print(f"Q: {row['instruction']}\nA: {answer}\n", flush=True)
    out = Path(cfg.infer.output_jsonl) if cfg.infer.output_jsonl else cfg.output_dir / "infer" / "answers.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))

