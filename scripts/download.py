"""Download the model from ModelScope, verify it and record its provenance (download.json).

    python scripts/download.py --config configs/huanhuan.yaml [--set model.revision=<tag>]
    make download CONFIG=configs/huanhuan.yaml

Writes <model.cache_dir>/<owner>/<name>/ (that is model.dir by default). A mirror: MODELSCOPE_DOMAIN=host[:port].
"""

from __future__ import annotations

import argparse
import warnings

# modelscope imports torch, whose pynvml warning would otherwise precede every message of this script.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")

from hunyuan_lora import config, download
from hunyuan_lora.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_cli_args(parser)
    cfg = config.from_args(parser.parse_args(argv))
    download.run(cfg)


if __name__ == "__main__":
    main()
