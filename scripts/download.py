"""make download: fetch the model from ModelScope (pinned revision), verify it, record download.json.

`python -m hunyuan_lora download --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("download")
