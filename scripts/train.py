"""make train: LoRA fine-tune with the HF Trainer, tracked in SwanLab (resume: auto).

`python -m hunyuan_lora train --help` lists the options (src/hunyuan_lora/cli.py).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("train")
