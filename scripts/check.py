"""make check: python scripts/check.py [--config FILE] [--model-dir DIR] [--data FILE] [--output-dir DIR] [--set k=v].

Checks config, model folder, patch, dataset, resume, output space and memory without loading any
weights; prints a table; exits 2 with one paragraph per problem (what, where, fix).
"""

import argparse

from hunyuan_lora import check, config
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config.add_cli_args(parser)
    check.run(config.from_args(parser.parse_args()))


if __name__ == "__main__":
    main()
