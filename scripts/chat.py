"""make chat: python scripts/chat.py [--config FILE] [--model-dir DIR] [--output-dir DIR] [--set k=v]."""

import argparse

from hunyuan_lora import chat, config
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    config.add_cli_args(parser)
    chat.run(config.from_args(parser.parse_args()))


if __name__ == "__main__":
    main()
