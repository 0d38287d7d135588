"""make eval: base vs adapter on the held-out split or EVAL=file -> <output_dir>/eval.

`python -m hunyuan_lora eval --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("eval")
