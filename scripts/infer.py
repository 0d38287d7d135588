"""make infer: answer PROMPT, infer.prompts or infer.input_jsonl with base + adapter.

`python -m hunyuan_lora infer --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("infer")
