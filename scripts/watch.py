"""make watch: the SwanLab dashboard on <output_dir>/swanlog.

`python -m hunyuan_lora watch --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("watch")
