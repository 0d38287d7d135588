"""loss.png: train and eval loss against step, drawn from the Trainer's log_history at the end of
`make train`, or again from its log_history.json:

    .venv/bin/python -m hunyuan_lora.loss_plot outputs/demo/log_history.json   # -> loss.png next to it
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .atomic import temp_file


def plot_loss(log_history: str | Path | list[dict], png_path: str | Path) -> Path:
    """loss.png: train loss (per logging step) and eval loss against step, from trainer.state.log_history.

    Takes the list itself or a log_history.json. Writes an axes-only plot with a note when no loss
    was logged yet (fewer steps than train.logging_steps), so the end of a run never fails here.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    from matplotlib.ticker import MaxNLocator

    if not isinstance(log_history, list):
        log_history = json.loads(Path(log_history).read_text(encoding="utf-8"))
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    if train or evals:
        ax.legend()
    else:
        ax.text(
            0.5,
            0.5,
            "no loss logged yet (fewer steps than train.logging_steps)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.5
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    png_path = Path(png_path)
    tmp = temp_file(png_path)
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path


if __name__ == "__main__":
    # python -m hunyuan_lora.loss_plot LOG_HISTORY_JSON [PNG]   (default: loss.png next to it)
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: .venv/bin/python -m hunyuan_lora.loss_plot outputs/<run>/log_history.json [loss.png]")
    src = Path(sys.argv[1])
    print(plot_loss(src, sys.argv[2] if len(sys.argv) == 3 else src.with_name("loss.png")))
