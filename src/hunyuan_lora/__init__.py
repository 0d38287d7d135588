"""hunyuan-lora: reproducible LoRA fine-tuning of Tencent Hunyuan-A13B-Instruct."""

__version__ = "0.1.0"

import logging
import sys
import warnings

# swanlab depends on pynvml, whose import warns on every run; it says nothing about this project.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
# DeepSpeed, which the Trainer imports in every stage, logs which accelerator it detected (twice on a CPU);
# its other messages still show. A filter on its logger outlasts the level DeepSpeed sets when it loads.
logging.getLogger("DeepSpeed").addFilter(lambda record: record.funcName != "get_accelerator")
# SwanLab colours its lines with ANSI codes even when they go to a file or a pipe (CI logs, `| tee`). Its
# line prefix is coloured when swanlab is imported, so this must come first. The GPU bench machine runs
# without swanlab (SWANLAB_MODE=disabled, bench/gpu_wheels.sh carries no swanlab).
try:
    from swankit.log.utils import FONT
except ModuleNotFoundError:
    FONT = None
if FONT is not None and not sys.stdout.isatty():
    for _colour in (
        "bold",
        "default",
        "blue",
        "grey",
        "underline",
        "green",
        "dark_green",
        "dark_gray",
        "yellow",
        "red",
        "magenta",
    ):
        setattr(FONT, _colour, staticmethod(str))
