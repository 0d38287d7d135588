"""bench/run.py's cases (the GPU harness itself needs CUDA): the micro-batches each case builds are what
its name says, and the cases of one comparison hold the same samples per optimizer step."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """A bench script as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script(REPO / "bench" / "run.py")

PAD = 127961


@pytest.fixture(scope="module")
def lengths():
    rng = random.Random(1)
    return [rng.randint(40, 400) for _ in range(200)]


def sample_lengths(batch: dict) -> list[int]:
    """Lengths of the samples of one micro-batch, row by row (packed rows: split where positions restart)."""
    out = []
    for mask, pos in zip(batch["attention_mask"], batch["position_ids"]):
        starts = [i for i in range(len(pos)) if pos[i] == 0 and mask[i]] + [int(mask.sum())]
        out += [b - a for a, b in zip(starts, starts[1:])]
    return out


def test_tutorial_batch_16_samples_and_packed_cases_hold_the_same_samples(lengths):
    mb4 = bench.make_batches("mb4", lengths, 8, 1024, PAD)
    mb16 = bench.make_batches("mb16", lengths, 2, 1024, PAD)
    cat16 = bench.make_batches("cat16", lengths, 2, 1024, PAD)
    for step in range(2):  # optimizer step = 4 micro-batches of mb4 = 1 of mb16 = 1 of cat16
        tutorial = [n for b in mb4[4 * step : 4 * step + 4] for n in b["attention_mask"].sum(1).tolist()]
        assert tutorial == mb16[step]["attention_mask"].sum(1).tolist() == sample_lengths(cat16[step])
        assert cat16[step]["tokens"] == sum(tutorial) == mb16[step]["tokens"]
        assert cat16[step]["samples"] == 16


def test_cat_is_one_row_without_padding_and_positions_restart_per_sample(lengths):
    (batch,) = bench.make_batches("cat16", lengths, 1, 1024, PAD)
    assert batch["input_ids"].shape[0] == 1
    assert batch["tokens"] == batch["padded"] == batch["input_ids"].shape[1]
    assert (batch["labels"] != -100).all()
    assert (batch["input_ids"] != PAD).all()
    first = sample_lengths(batch)[0]
    assert batch["position_ids"][0, :first].tolist() == list(range(first))
    assert batch["position_ids"][0, first] == 0


def test_pack_fills_rows_with_whole_samples_and_masks_the_rest(lengths):
    (batch,) = bench.make_batches("pack4096", lengths, 1, 1024, PAD)
    assert tuple(batch["input_ids"].shape) == (4, 1024)
    assert batch["tokens"] == int(batch["attention_mask"].sum()) > 0.8 * 4096
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert all(n <= 400 for n in sample_lengths(batch))  # whole samples: none cut at a row's end
    assert set(sample_lengths(batch)) <= set(lengths)


def test_case_names_parse_and_typos_are_refused():
    assert bench.parse_case("cat16x1") == ("cat16", 1)
    assert bench.parse_case("mb4x4") == ("mb4", 4)
    assert bench.parse_case("pack16384") == ("pack16384", 1)
    for bad in ("cat", "mbx4", "batch4", "pack16k"):
        with pytest.raises(SystemExit):
            bench.parse_case(bad)
    assert torch.is_tensor(bench.make_batches("mb4", [50] * 8, 1, 1024, PAD)[0]["input_ids"])
