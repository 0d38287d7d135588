"""make eval: python scripts/eval.py [--config FILE] [--eval FILE] [--model-dir DIR] [--output-dir DIR] [--set k=v]."""

import argparse
import os

from hunyuan_lora import config, evaluate
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    config.add_cli_args(parser)
    # make eval EVAL=... arrives as HL_EVAL, exactly as typed
    parser.add_argument("--eval", default=os.environ.get("HL_EVAL") or None,
                        help="file to evaluate on (any dataset format) instead of the held-out split")
    args = parser.parse_args()
    cfg = config.from_args(args)
    if args.eval:
        cfg.eval.input = args.eval
    evaluate.run(cfg)


if __name__ == "__main__":
    main()
