"""make merge: fold the adapter into the base weights -> <output_dir>/merged.

`python -m hunyuan_lora merge --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("merge")
