"""hunyuan-lora: reproducible LoRA fine-tuning of Tencent Hunyuan-A13B-Instruct."""

__version__ = "0.1.0"
