"""python -m hunyuan_lora <stage> [options]: see cli.py."""

from .cli import main

main()
