"""make probe: python scripts/probe.py [--config FILE] [--model-dir DIR] [--output-dir DIR] [--set k=v]
[--steps N] [--layers N] [--lengths FILE] [--profile]; make passes PROBE_STEPS / PROBE_LAYERS /
PROBE_LENGTHS / PROBE_PROFILE."""

import argparse
import os

from hunyuan_lora import config, probe
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    config.add_cli_args(parser)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("PROBE_STEPS") or 20),
                        help="optimizer steps to run (PROBE_STEPS, default 20)")
    parser.add_argument("--layers", type=int, default=int(os.environ["PROBE_LAYERS"]) if os.environ.get("PROBE_LAYERS")
                        else None, help="decoder layers to build (PROBE_LAYERS; default: all of the config)")
    parser.add_argument("--lengths", default=os.environ.get("PROBE_LENGTHS") or None,
                        help="JSON of per-sample token counts (PROBE_LENGTHS), "
                             "e.g. ../shared/data/huanhuan_token_lengths.json")
    parser.add_argument("--profile", action="store_true", default=os.environ.get("PROBE_PROFILE") == "1",
                        help="profile one extra step: kernels, GPU busy, dequantisation share (PROBE_PROFILE=1)")
    args = parser.parse_args()
    probe.run(config.from_args(args), steps=args.steps, layers=args.layers, lengths=args.lengths,
              profile=args.profile)


if __name__ == "__main__":
    main()
