"""hunyuan-lora: reproducible LoRA fine-tuning of Tencent Hunyuan-A13B-Instruct."""

__version__ = "0.1.0"

import warnings

# swanlab depends on pynvml, whose import warns on every run; it says nothing about this project.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
