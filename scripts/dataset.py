"""make dataset: read, validate and tokenize the dataset -> <output_dir>/data.

`python -m hunyuan_lora dataset --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("dataset")
