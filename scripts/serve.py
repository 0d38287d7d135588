"""make serve: an OpenAI-compatible server on 127.0.0.1 over base + adapter.

`python -m hunyuan_lora serve --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("serve")
