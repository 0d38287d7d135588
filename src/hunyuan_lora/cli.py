"""One command line for every stage: `python -m hunyuan_lora <stage>` (or the `hunyuan-lora` script).

    python -m hunyuan_lora train --config configs/demo.yaml --set train.max_steps=2
    python -m hunyuan_lora infer --help                # the shared options + the stage's own
    scripts/<stage>.py                                 # what the Makefile runs: main("<stage>")

Every stage gets the same run selection (--config, --model-dir, --data, --output-dir, --set; make
hands CONFIG, MODEL_DIR, ... over through the environment, config.add_cli_args), builds the config,
and calls `<module>.run(cfg, **options)`. A stage with options of its own defines
`add_arguments(parser)`; its arguments' values reach run() by their dest names. Stages are imported
by name, when asked for, so this module depends on none of them.
"""

from __future__ import annotations

import argparse
import importlib
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


def parser_for(stage: str, module) -> argparse.ArgumentParser:
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=f"python -m hunyuan_lora {stage}", description=summary,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_cli_args(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser


@exit_on_user_error
def main(stage: str | None = None, argv: list[str] | None = None):
    """Run one stage; stage None: the first argument names it."""
    argv = sys.argv[1:] if argv is None else argv
    if stage is None:
        if not argv or argv[0] not in STAGES:
            sys.exit("usage: python -m hunyuan_lora <stage> [options]   (stage: " + ", ".join(STAGES)
                     + "; <stage> --help lists its options)")
        stage, argv = argv[0], argv[1:]
    module = importlib.import_module(f"{__package__}.{STAGES[stage]}")
    args = parser_for(stage, module).parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in SHARED_OPTIONS}
    cfg = config.from_args(args)
    # one run at a time writes an output folder (under accelerate, its main process holds the lock)
    held = lock.hold(cfg.output_dir, stage) if stage in lock.WRITERS and is_main_process() else nullcontext()
    with held:
        return module.run(cfg, **options)
