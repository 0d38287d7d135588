"""Stage: eval, answer a held-out set with the base model and with the adapter, and score both.

    make eval [CONFIG=...]              # the records data.eval_ratio held out (`make dataset` wrote them)
    make eval EVAL=my_test.jsonl        # any dataset format; each record's last answer is the reference

Each record's prompt is built by prompt.py exactly as training builds it (earlier turns as context,
thinking as the reference answer has it); generation is greedy, eval.batch_size records at a time
(longest prompts first, left-padded), each batch by the adapter and then by the base model. The answer
and the reference are compared after extract_answer (reasoning and <answer> tags removed), with
LLaMA-Factory's metrics:
BLEU-4 over characters (nltk, smoothing method 3) and ROUGE-1/2/L over jieba words (rouge-chinese),
as percentages, plus exact match. Writes <output_dir>/eval/{eval.json, answers.jsonl, report.md}
(published together) and logs the metrics and the side-by-side answers to SwanLab.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from .atomic import aside_path, check_replaceable, staging_dir, write_json, write_text
from .config import Config
from .errors import UserError
from .generation import Completion, Sampling, generate_batches
from .modeling import load_for_generation
from .prompt import dataset_mismatch, extract_answer, is_thinking, prompt_ids, prompt_messages
from .records import Record, read_records
from .tracking import swanlab_mode

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")


def eval_records(cfg: Config) -> tuple[Path, list[Record]]:
    """EVAL's file, or the held-out split `make dataset` wrote (refused when stale)."""
    if cfg.eval.input:
        path = Path(cfg.eval.input)
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise UserError(
                f"the evaluation file {path} {what}",
                where="EVAL (eval.input)",
                fix="give a file in any dataset format (make eval EVAL=my_test.jsonl), or no EVAL to "
                "score the records `make dataset` held out (data.eval_ratio)",
            )
    else:
        path = cfg.output_dir / "data" / "eval.jsonl"
        if not (path.parent / "stats.json").is_file():
            raise UserError(
                f"no tokenized dataset in {path.parent}, so no held-out records to score",
                where="run.output_dir",
                fix="run `make dataset` first, with records held out for make eval (e.g. "
                "SET=data.eval_ratio=0.1, then `make train`), or give a file: make eval "
                "EVAL=my_test.jsonl",
            )
        no_split = UserError(
            f"no held-out records in {path}",
            where="data.eval_ratio",
            fix="set data.eval_ratio (e.g. SET=data.eval_ratio=0.1) and run `make dataset` again, "
            "or give a file: make eval EVAL=my_test.jsonl",
        )
        if not path.is_file() or not path.read_bytes().strip():
            raise no_split
        stats = json.loads((path.parent / "stats.json").read_text(encoding="utf-8"))
        if problems := dataset_mismatch(cfg, stats):
            raise UserError(
                "the held-out split is stale: " + "; ".join(problems),
                where=str(path.parent),
                fix="rerun `make dataset` with this CONFIG (then retrain before judging the adapter)",
            )
    records, _ = read_records(path, drop_duplicates=False)
    return path, records[: cfg.eval.limit] if cfg.eval.limit else records


def scores(prediction: str, reference: str) -> dict[str, float]:
    """One answer's metrics, as LLaMA-Factory's ComputeSimilarity computes them (percent, 4 decimals)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # not its "Building prefix dict" lines for every run
    hypothesis, ref_words = list(jieba.cut(prediction)), list(jieba.cut(reference))
    if not " ".join(hypothesis).split() or not " ".join(ref_words).split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        rouge = {k: v["f"] for k, v in Rouge().get_scores(" ".join(hypothesis), " ".join(ref_words))[0].items()}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    out = {"bleu-4": bleu, **rouge, "exact_match": float(prediction.strip() == reference.strip())}
    return {k: round(out[k] * 100, 4) for k in METRICS}


def mean_scores(rows: list[dict], side: str) -> dict[str, float]:
    return {k: round(sum(r[f"{side}_scores"][k] for r in rows) / len(rows), 4) for k in METRICS}


def report_markdown(summary: dict, rows: list[dict], shown: int) -> str:
    sides = list(summary["metrics"])
    lines = [
        f"# eval: {summary['records']} records from {summary['source']}",
        "",
        f"model {summary['model']}, adapter {summary['adapter']}, greedy, max_new_tokens {summary['max_new_tokens']}",
        "",
        "| metric | " + " | ".join(sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    lines += [f"| {k} | " + " | ".join(f"{summary['metrics'][s][k]:.2f}" for s in sides) + " |" for k in METRICS]
    lines += ["", f"## the first {min(shown, len(rows))} answers", ""]
    cell = lambda text: (text or "").replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines += ["| prompt | reference | " + " | ".join(sides) + " |", "|---|---|" + "---|" * len(sides)]
    lines += [
        f"| {cell(r['prompt'])} | {cell(r['reference'])} | " + " | ".join(cell(r[s]) for s in sides) + " |"
        for r in rows[:shown]
    ]
    return "\n".join(lines) + "\n"


def _log_to_swanlab(cfg: Config, summary: dict, rows: list[dict], table: str) -> None:
    mode = swanlab_mode(cfg)
    if mode == "disabled":
        return
    import swanlab

    # swanlab.init writes SWANLAB_MODE / SWANLAB_LOG_DIR / hosts into os.environ and never removes
    # them: every process this one starts later (a training run, `swanlab watch`) would log there.
    environ = dict(os.environ)
    swanlab.init(
        project=cfg.swanlab.project,
        experiment_name=f"{cfg.swanlab.experiment or cfg.run.name}-eval",
        logdir=str(cfg.output_dir / "swanlog"),
        mode=mode,
        config={k: v for k, v in summary.items() if k != "metrics"},
    )
    try:
        swanlab.log({f"eval/{side}/{k}": v for side, m in summary["metrics"].items() for k, v in m.items()})
        swanlab.log(
            {
                "eval/report": swanlab.Text(table, caption="metrics and answers (report.md)"),
                "eval/answers": [
                    swanlab.Text(r[side] or "", caption=f"{side}: {r['prompt'][:60]}")
                    for r in rows[: cfg.eval.report_samples]
                    for side in summary["metrics"]
                ],
            }
        )
    finally:
        swanlab.finish()
        os.environ.clear()
        os.environ.update(environ)


def _answer(
    model,
    tokenizer,
    side: str,
    completions: dict,
    rows: dict[int, dict],
    records: list[Record],
    asked: list[list[dict]],
) -> None:
    """One batch's answers from one side into rows[record index]: the base side is the same model
    with its adapter switched off."""
    off = model.disable_adapter() if side == "base" else contextlib.nullcontext()
    with off:
        for c in generate_batches(model, tokenizer, list(completions), len(completions)):
            i = completions[c]
            reference = extract_answer(records[i].answer)
            row = rows.setdefault(
                i, {"where": records[i].where, "prompt": asked[i][-1]["content"], "reference": reference}
            )
            row[side], row[f"{side}_raw"] = extract_answer(c.text), c.text
            row[f"{side}_scores"] = scores(row[side], reference)


def keep_earlier(out: Path) -> Path | None:
    """Move an earlier eval/ aside to eval.<its time>/, as infer keeps earlier answers; None if there is none."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    made = out / "eval.json" if (out / "eval.json").is_file() else out
    aside = aside_path(out, time.strftime("%Y%m%d-%H%M%S", time.localtime(made.stat().st_mtime)))
    os.replace(out, aside)
    return aside


def add_arguments(parser) -> None:
    # make eval EVAL=... arrives as HL_EVAL, exactly as typed
    parser.add_argument(
        "--eval",
        dest="eval_file",
        default=os.environ.get("HL_EVAL") or None,
        help="evaluate on this file (any dataset format) instead of the held-out split",
    )


def run(cfg: Config, eval_file: str | None = None) -> Path:
    from tqdm import tqdm

    if eval_file:
        cfg.eval.input = eval_file
    source, records = eval_records(cfg)
    out = cfg.output_dir / "eval"
    check_replaceable(out, where="run.output_dir")
    loaded, tokenizer = load_for_generation(cfg)
    model, adapter = loaded.model, loaded.adapter
    sides = ["adapter", "base"] if cfg.eval.compare_base and adapter is not None else ["adapter"]
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens, do_sample=False)
    asked = [prompt_messages(r, cfg) for r in records]
    ids = [prompt_ids(tokenizer, m, is_thinking(r.answer)) for m, r in zip(asked, records)]
    order = sorted(range(len(records)), key=lambda i: len(ids[i]), reverse=True)  # a batch pads little
    rows: dict[int, dict] = {}
    with staging_dir(out) as tmp:
        with (
            open(tmp / "answers.jsonl", "w", encoding="utf-8") as f,
            tqdm(total=len(records), desc="eval", unit="record") as progress,
        ):
            for start in range(0, len(order), cfg.eval.batch_size):
                batch = order[start : start + cfg.eval.batch_size]
                for side in sides:
                    _answer(
                        model, tokenizer, side, {Completion(ids[i], sampling): i for i in batch}, rows, records, asked
                    )
                for i in batch:  # written as each batch finishes; in the input's order below
                    f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
                f.flush()
                progress.update(len(batch))
        rows = [rows[i] for i in range(len(records))]
        write_text(tmp / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary = {
            "source": str(source),
            "records": len(rows),
            "model": cfg.model.dir,
            "adapter": str(adapter) if adapter else "merged into the model folder",
            "max_new_tokens": cfg.eval.max_new_tokens,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "metrics": {side: mean_scores(rows, side) for side in sides},
        }
        table = report_markdown(summary, rows, cfg.eval.report_samples)
        write_json(tmp / "eval.json", summary)
        write_text(tmp / "report.md", table)
        kept = keep_earlier(out)  # last, so that a failed eval leaves the earlier one where it was
    if kept:
        print(f"the earlier eval in {out} was moved to {kept} (kept: this run scored anew)")
    _log_to_swanlab(cfg, summary, rows, table)
    for side in sides:
        print(f"{side:>8}: " + "  ".join(f"{k} {v:.2f}" for k, v in summary["metrics"][side].items()))
    print(f"wrote {out}/eval.json, answers.jsonl, report.md")
    return out
