"""make infer: python scripts/infer.py [--config FILE] [--prompt TEXT] [--set infer.input_jsonl=q.jsonl] ..."""

import argparse
import os

from hunyuan_lora import config, infer
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    config.add_cli_args(parser)
    # make infer PROMPT=... arrives as HL_PROMPT, exactly as typed
    parser.add_argument("--prompt", default=os.environ.get("HL_PROMPT") or None, help="one prompt instead of infer.prompts")
    args = parser.parse_args()
    cfg = config.from_args(args)
    if args.prompt:
        cfg.infer.prompts, cfg.infer.input_jsonl = [args.prompt], None
    print(f"answers written to {infer.run(cfg)}")


if __name__ == "__main__":
    main()
