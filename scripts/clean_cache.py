"""make clean-cache: delete the NF4 cache of the model folder (model.nf4_cache).

`python -m hunyuan_lora clean-cache --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("clean-cache")
