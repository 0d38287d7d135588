"""make patch: define the `logger` hunyuan.py uses (python scripts/patch.py [--check] [--model-dir DIR])."""

import argparse
import sys

from hunyuan_lora import config, patch
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    config.add_cli_args(parser)
    parser.add_argument("--check", action="store_true", help="report whether the patch is needed; write nothing")
    args = parser.parse_args()
    cfg = config.from_args(args)
    patch.run(cfg, check_only=args.check)
    if args.check and patch.patch_folder(cfg.model.dir, check_only=True).needed:
        sys.exit(1)


if __name__ == "__main__":
    main()
