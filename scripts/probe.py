"""make probe: the config's training on random weights, measured (PROBE_STEPS, PROBE_LAYERS, PROBE_LENGTHS,
PROBE_PROFILE, PROBE_GENERATION).

`python -m hunyuan_lora probe --help` lists the options (src/hunyuan_lora/cli.py, probe.add_arguments).
"""

from hunyuan_lora.cli import main

if __name__ == "__main__":
    main("probe")
