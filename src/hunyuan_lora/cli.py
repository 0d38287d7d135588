"""One command line for every stage: `python -m hunyuan_lora <stage>` (or the `hunyuan-lora` script).

    python -m hunyuan_lora train --config configs/demo.yaml --set train.max_steps=2
    python -m hunyuan_lora infer --help                # the shared options + the stage's own
    scripts/<stage>.py                                 # what the Makefile runs: main("<stage>")

Every stage gets the same run selection (--config, --model-dir, --data, --output-dir, --set; make
hands CONFIG, MODEL_DIR, ... over through the environment, add_cli_args), builds the config,
and calls `<module>.run(cfg, **options)`. A stage with options of its own defines
`add_arguments(parser)`; its arguments' values reach run() by their dest names. Stages are imported
by name, when asked for, so this module depends on none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from contextlib import nullcontext

from . import config, lock
from .errors import exit_on_user_error
from .runtime import is_main_process

# command -> module (the Makefile target's name, when it differs from the module's)
STAGES = {
    "download": "download",
    "patch": "patch",
    "dataset": "data",
    "check": "check",
    "train": "train",
    "infer": "infer",
    "merge": "merge",
    "clean-cache": "clean_cache",
    "watch": "watch",
    "probe": "probe",
    "chat": "chat",
    "eval": "evaluate",
    "serve": "serve",
}
SHARED_OPTIONS = ("config", "model_dir", "data", "output_dir", "overrides")


def add_cli_args(parser) -> None:
    """The arguments every stage script shares. Make passes CONFIG, MODEL_DIR, DATA, OUTPUT_DIR and
    SET through the environment (HL_CONFIG ...), so what a user typed arrives unchanged; an option
    given on the command line wins over its variable, --set comes after SET."""
    env = {k: os.environ.get(f"HL_{k}") or None for k in ("CONFIG", "MODEL_DIR", "DATA", "OUTPUT_DIR")}
    parser.add_argument("--config", default=env["CONFIG"], help="YAML run config (configs/*.yaml)")
    parser.add_argument("--model-dir", default=env["MODEL_DIR"], help="override model.dir")
    parser.add_argument("--data", default=env["DATA"], help="override data.path")
    parser.add_argument("--output-dir", default=env["OUTPUT_DIR"], help="override run.output_dir")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key (repeatable)",
    )


def from_args(args) -> config.Config:
    """The run config from the shared options (add_cli_args) and SET."""
    overrides = split_overrides(os.environ.get("HL_SET", "")) + args.overrides
    return config.load(
        args.config,
        overrides,
        model_dir=args.model_dir or None,
        data=args.data or None,
        output_dir=args.output_dir or None,
    )


_KEY_START = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_][\w.]*=")


def split_overrides(text: str) -> list[str]:
    """Make's SET="a.b=1 c.d=x y": a new override starts at whitespace followed by `section.key=`,
    outside quotes, so values keep their spaces, quotes and brackets (`infer.prompts=[a, b]`)."""
    parts, start, quote = [], 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'" and (i == 0 or text[i - 1] in "= [,"):
            quote = ch
        elif ch.isspace() and _KEY_START.match(text, i + 1):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parser_for(stage: str, module) -> argparse.ArgumentParser:
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog=f"python -m hunyuan_lora {stage}",
        description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser


@exit_on_user_error
def main(stage: str | None = None, argv: list[str] | None = None):
    """Run one stage; stage None: the first argument names it."""
    argv = sys.argv[1:] if argv is None else argv
    if stage is None:
        if not argv or argv[0] not in STAGES:
            sys.exit(
                "usage: python -m hunyuan_lora <stage> [options]   (stage: "
                + ", ".join(STAGES)
                + "; <stage> --help lists its options)"
            )
        stage, argv = argv[0], argv[1:]
    module = importlib.import_module(f"{__package__}.{STAGES[stage]}")
    args = parser_for(stage, module).parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in SHARED_OPTIONS}
    cfg = from_args(args)
    # one run at a time writes an output folder (under accelerate, its main process holds the lock)
    held = lock.hold(cfg.output_dir, stage) if stage in lock.WRITERS and is_main_process() else nullcontext()
    with held:
        return module.run(cfg, **options)
