"""make patch: define the `logger` the model folder's hunyuan.py uses (--check: report only).

`python -m hunyuan_lora patch --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("patch")
