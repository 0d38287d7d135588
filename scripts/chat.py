"""make chat: talk to base + adapter (or a merged folder) in the terminal.

`python -m hunyuan_lora chat --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("chat")
