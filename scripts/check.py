"""make check: the preflight table (config, model folder, patch, dataset, resume, disk, memory); nothing is loaded.

`python -m hunyuan_lora check --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("check")
