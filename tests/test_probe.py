"""make probe on the stand-in (CPU): the config's real training code on random weights, and its report.

.venv/bin/python -m pytest tests/test_probe.py
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from hunyuan_lora import config, probe
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FIELDS = {
    "card",
    "gpus",
    "layers",
    "quantization",
    "moe_impl",
    "samples_per_optimizer_step",
    "steady_s_per_step",
    "warmup_s",
    "samples_per_s",
    "tokens_per_s",
    "peak_gib",
    "gemm_tflops",
    "code_commit",
    "mfu",
    "eta_s",
    "verdict",
    "memory",
    "lengths_from",
    "code",
    "architecture_from",
    "step_s",
    "run_steps",
}


def check_consistent(r: dict, steps: int) -> None:
    times = r["step_s"]
    assert len(times) == r["steps"] == steps
    assert sum(times) <= r["train_wall_s"] + 0.05  # every step lies inside the training call
    warm = r["warmup_steps"]
    assert 1 <= warm < steps
    assert r["steady_s_per_step"] == pytest.approx(statistics.median(times[warm:]), abs=1e-4)
    assert r["mean_s_per_step_after_warmup"] == pytest.approx(statistics.fmean(times[warm:]), abs=1e-4)
    assert r["warmup_s"] == pytest.approx(max(0.0, sum(times[:warm]) - warm * r["steady_s_per_step"]), abs=2e-3)
    assert r["samples_per_s"] == pytest.approx(r["samples_per_step_measured"] / r["steady_s_per_step"], rel=1e-2)
    assert r["tokens_per_s"] == pytest.approx(r["real_tokens_per_step"] / r["steady_s_per_step"], rel=1e-2)
    eta = r["warmup_s"] + r["run_steps"] * r["mean_s_per_step_after_warmup"]
    assert r["eta_s"] == pytest.approx(eta, rel=1e-2, abs=0.05)  # eta_s is rounded to 0.1 s
    assert set(r["verdict"]) == {"24GB", "48GB", "80GB", "141GB"}
    assert all(v in ("fits with headroom", "fits", "does not fit") for v in r["verdict"].values())


def check_generation(r: dict, cfg, records: int) -> None:
    """The generation part: its keys, and the samples time and eval ETA derived from what it measured."""
    gen = r["generation"]
    b1, bb = gen["batch1"], gen["batched"]
    assert r["gen_batch_size"] == 64
    assert gen["new_tokens"] == probe.GEN_NEW_TOKENS
    assert r["gen_tokens_per_s_batch1"] == b1["per_stream_tokens_per_s"] > 0
    assert (
        r["gen_tokens_per_s_batched"]
        == bb["tokens_per_s"]
        == pytest.approx(64 * bb["per_stream_tokens_per_s"], rel=1e-2)
    )
    assert r["gen_time_to_first_token_s"] == b1["ttft_s"] > 0
    assert b1["ttft_s"] < b1["total_s"]
    held_out = math.ceil(cfg.data.eval_ratio * records) if cfg.data.eval_ratio else math.ceil(0.05 * records)
    assert gen["eval_records"] == held_out
    assert gen["eval_sides"] == 2
    eta = 2 * math.ceil(held_out / 64) * (bb["ttft_s"] + (cfg.eval.max_new_tokens - 1) / bb["per_stream_tokens_per_s"])
    assert r["gen_eval_eta_s"] == pytest.approx(eta, rel=1e-2, abs=0.1)
    prompts = len(cfg.infer.prompts[:8])
    samples = 2 * prompts * (b1["ttft_s"] + (min(cfg.infer.max_new_tokens, 48) - 1) / b1["per_stream_tokens_per_s"])
    assert gen["samples_s"] == pytest.approx(samples, rel=1e-2, abs=0.1)


def check_load(r: dict) -> None:
    """The load part: each stage's wait is its load (bytes over the measured read rate) plus what the probe
    measured after it."""
    ld = r["load"]
    rate = ld["read_bytes_per_s"]
    assert rate > 0
    assert ld["from_checkpoint_s"] == pytest.approx(ld["checkpoint_bytes"] / rate, abs=0.05)
    train, evaluate = ld["stages"]["train"], ld["stages"]["eval"]
    assert train["then_s"] == pytest.approx(r["eta_s"] + r["generation"]["samples_s"], abs=0.05)
    assert train["from_checkpoint_s"] == pytest.approx(ld["from_checkpoint_s"] + train["then_s"], abs=0.1)
    assert evaluate["from_checkpoint_s"] == pytest.approx(ld["from_checkpoint_s"] + r["gen_eval_eta_s"], abs=0.1)
    assert ld["merge_s"] == pytest.approx(2 * ld["checkpoint_bytes"] / rate, abs=0.05)
    if r["quantization"] == "nf4":
        assert ld["cache_bytes"] < ld["checkpoint_bytes"]  # 4 bits + scales against 16 (the embedding stays bf16)
        assert ld["from_cache_s"] == pytest.approx(ld["cache_bytes"] / rate, abs=0.05)
        assert train["from_cache_s"] == pytest.approx(ld["from_cache_s"] + train["then_s"], abs=0.1)
    else:
        assert ld["cache_bytes"] is None
        assert train["from_cache_s"] is None
    md = probe.markdown(r)
    assert "| stage | load from the checkpoint | load from the NF4 cache |" in md
    assert "| merge (no GPU) |" in md


def test_probe_fast_nf4_packed_with_a_lengths_file(stand_in_dir, tmp_path):
    """configs/huanhuan_qlora.yaml's switches (fast NF4 experts, 16 packed samples) on the stand-in, one layer."""
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"tokens": [37] * 50, "answer_tokens": [9] * 50}))
    cfg = config.load(
        REPO / "configs/huanhuan_qlora.yaml",
        ["swanlab.mode=disabled", "model.device=cpu", "model.device_map=null", "train.optim=adamw_torch"],
        model_dir=str(stand_in_dir),
        output_dir=str(tmp_path / "run"),
    )
    out = probe.run(cfg, steps=4, layers=1, lengths=str(lengths), compare=True)
    r = json.loads((out / "probe.json").read_text())
    assert set(r) >= FIELDS
    assert (r["layers"], r["layers_in_config"], r["depth_cut"]) == (1, 2, True)
    assert (r["moe_impl"], r["quantization"], r["nf4_products"], r["device"]) == ("fast", "nf4", "auto", "cpu")
    assert "grouped experts" in r["code"]
    assert str(stand_in_dir) in r["architecture_from"]
    assert r["lengths_from"].startswith(f"token lengths from {lengths}")
    # 16 samples of 37 tokens per step, packed into one row (padding to 64 is not counted)
    assert r["samples_per_optimizer_step"] == 16
    assert r["samples_per_step_measured"] == 16
    assert r["real_tokens_per_step"] == 16 * 37
    assert r["run_steps"] == 4  # 50 records / 16 per step, one epoch: ceil = 4
    assert len(r["loss_per_step"]) == 4
    assert all(v > 0 for v in r["loss_per_step"])
    # collected on the device, step by step: their mean is the Trainer's own training loss (one log, at the end)
    assert statistics.mean(r["loss_per_step"]) == pytest.approx(r["final_loss"], abs=1e-3)
    check_consistent(r, 4)
    phases = r["steady_phases_s"]  # where the steps' time went, from the Trainer's callbacks
    assert set(phases) == set(probe.StepClock.PHASES)
    assert all(v >= 0 for v in phases.values())
    assert phases["micro_steps"] > phases["optimizer"]  # forward and backward of 16 samples against one AdamW step
    md = (out / "probe.md").read_text()
    assert f"micro-steps (forward, backward, clipping) {phases['micro_steps']}" in md
    assert "quantization nf4 (NF4 products: auto, dequantised by bitsandbytes)" in md  # a CPU run
    assert "cut from 2: PROBE_LAYERS" in md
    assert f"{r['steady_s_per_step']} s per optimizer step" in md
    # PROBE_COMPARE: the same samples through the per-expert upstream path, unpacked, in the same run
    b = r["baseline"]
    assert (b["moe_impl"], b["train"]["packing"]) == ("upstream", False)
    assert "grouped" not in b["code"]
    assert len(b["step_s"]) == 4
    assert len(b["loss_per_step"]) == 4
    # rounded to two decimals (of unrounded rates): on the CPU the ratio can be small enough (0.16) for 1 % to fail
    assert r["speedup_vs_baseline"] == pytest.approx(r["samples_per_s"] / b["samples_per_s"], abs=0.006)
    assert f"**{r['speedup_vs_baseline']}x** that baseline" in md
    check_generation(r, cfg, records=50)
    assert r["generation"]["prompt_tokens"] == 37 - 9  # the samples without their answers
    assert f"| batch 1 | **{r['gen_tokens_per_s_batch1']} tokens/s**" in md
    assert "no held-out split configured: 5% of the records" in md
    check_load(r)


def test_probe_upstream_on_the_raw_dataset(stand_in_dir, tmp_path):
    """The demo config as it is: the folder's own code, the raw dataset through the folder's tokenizer."""
    cfg = config.load(
        REPO / "configs/demo.yaml",
        ["swanlab.mode=disabled"],
        model_dir=str(stand_in_dir),
        output_dir=str(tmp_path / "run"),
    )
    out = probe.run(cfg, steps=3)
    r = json.loads((out / "probe.json").read_text())
    assert (r["layers"], r["depth_cut"], r["moe_impl"], r["quantization"]) == (2, False, "upstream", "none")
    assert r["code"].startswith("the model folder's own code")
    assert "through the model folder's" in r["lengths_from"]
    per_step = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    assert r["samples_per_step_measured"] == per_step
    check_consistent(r, 3)
    check_load(r)


def test_probe_without_generation_measures_training_only(stand_in_dir, tmp_path, monkeypatch):
    """PROBE_GENERATION=0: the training part alone (the model is built once); the report says generation was not
    measured, and the eval stage's wait is its load alone."""
    import argparse

    monkeypatch.setenv("PROBE_GENERATION", "0")
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    assert parser.parse_args([]).generation is False
    cfg = config.load(
        REPO / "configs/demo.yaml",
        ["swanlab.mode=disabled"],
        model_dir=str(stand_in_dir),
        output_dir=str(tmp_path / "run"),
    )
    out = probe.run(cfg, steps=2, generation=False)
    r = json.loads((out / "probe.json").read_text())
    check_consistent(r, 2)
    assert "generation" not in r
    assert not any(k.startswith("gen_") for k in r)
    evaluate = r["load"]["stages"]["eval"]
    assert evaluate["then_s"] is None
    assert evaluate["from_checkpoint_s"] == r["load"]["from_checkpoint_s"]
    md = (out / "probe.md").read_text()
    assert "Generation: not measured (PROBE_GENERATION=0)." in md
    assert "| batch 1 |" not in md


def test_probe_refuses_what_it_cannot_measure(stand_in_dir, tmp_path):
    cfg = config.load(
        REPO / "configs/demo.yaml",
        ["swanlab.mode=disabled"],
        model_dir=str(stand_in_dir),
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(UserError, match="at least 2 optimizer steps"):
        probe.run(cfg, steps=1)
    cfg.train.optim = "adamw_torch_4bit"  # torchao: not in the lock
    with pytest.raises(UserError, match="train.optim: train.optim 'adamw_torch_4bit' needs a package"):
        probe.run(cfg, steps=2)
    cfg.train.optim = "adamw_torch"
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": []}')
    with pytest.raises(UserError, match="no list of token counts"):
        probe.run(cfg, steps=2, lengths=str(bad))
    assert not (tmp_path / "run" / "probe").exists()  # nothing written for a refused probe


def test_summarize_derives_the_report_from_what_was_measured():
    """Known step times: the first quarter is warm-up, the steady step the median of the rest, MFU
    6 x active parameters x real tokens/s over the GEMM rate, the ETA the configured run's steps."""
    cfg = config.load(REPO / "configs/demo.yaml", ["train.max_steps=-1", "train.num_train_epochs=2"])
    times = [5.0, 4.0, 2.0, 2.0, 3.0, 2.0, 2.0, 2.0]
    steps = [{"s": t, "samples": 16, "tokens": 1600 if i < 2 else 1000} for i, t in enumerate(times)]
    r = probe.summarize(
        cfg,
        probe.Measurement(
            steps=steps,
            per_step=16,
            records=100,
            gemm_rate=1e14,
            gemm_what="a 4096 GEMM",
            lengths_source="a file",
            init={
                "layers": 2,
                "layers_in_config": 4,
                "architecture_from": "the stand-in",
                "code": "the project's",
                "init_s": 1.5,
            },
            device="cpu",
            trainable=1000,
            total=10**6,
            train_wall_s=25.0,
            smi_peak={},
            active_params=10**9,
            loss=2.5,
        ),
    )
    check_consistent(r, len(times))
    assert (r["warmup_steps"], r["steady_s_per_step"], r["warmup_s"]) == (2, 2.0, 5.0)  # 5 + 4 - 2 x 2
    assert (r["samples_per_s"], r["tokens_per_s"], r["real_tokens_per_step"]) == (8.0, 500.0, 1000.0)
    assert r["mfu"] == 0.03
    assert r["gemm_tflops"] == 100.0
    assert r["run_steps"] == 14
    assert r["eta_s"] == round(5.0 + 14 * 13 / 6, 1)
    assert (r["layers"], r["depth_cut"], r["init_s"], r["lengths_from"]) == (2, True, 1.5, "a file")
    assert r["lora"]["trainable"] == 1000
    assert r["final_loss"] == 2.5
    assert r["card"] == "cpu"
    assert r["gpus"] == 0


def test_step_phases_split_the_step_at_the_trainers_marks():
    """Host marks (no GPU): a step runs from the previous step's end to its own; before = that end to begin,
    micro_steps = begin to the optimizer, optimizer = its step, after = the rest; the counts and the loss are
    read at the end of training; a step missing a mark gets no phases."""
    clock = probe.StepClock()
    clock.start = 9.0
    marks = {"begin": 10.5, "optimizer": 12.0, "after": 12.25, "end": 13.0}
    second = {"begin": 13.5, "optimizer": 14.0, "after": 14.5, "end": 15.0}
    clock.pending = [(marks, (3, 100), torch.tensor(2.5)), (second, (torch.tensor(4), torch.tensor(90)), None)]
    clock.resolve()
    first, then = clock.steps
    assert first == {
        "s": 4.0,
        "samples": 3,
        "tokens": 100,
        "loss": 2.5,
        "phases": {"before": 1.5, "micro_steps": 1.5, "optimizer": 0.25, "after": 0.75},
    }
    assert (then["s"], then["samples"], then["tokens"], "loss" in then) == (2.0, 4, 90, False)
    assert then["phases"] == {"before": 0.5, "micro_steps": 0.5, "optimizer": 0.5, "after": 0.5}
    del marks["optimizer"]
    assert clock.phases(9.0, marks) is None
    steps = [{"s": 2.0, "phases": {"before": b, "micro_steps": 1.0, "optimizer": 0.1, "after": 0.2}} for b in (3, 1, 2)]
    assert probe.steady_phases(steps) == {"before": 2, "micro_steps": 1.0, "optimizer": 0.1, "after": 0.2}
    assert probe.steady_phases(steps + [{"s": 2.0}]) is None


def test_gpu_idle_is_split_by_segment_and_its_largest_gaps_named_by_the_host_op_running():
    """Kernels (microseconds) overlapping and apart: idle is the window minus their union, cut at the segment
    starts; each gap is named by the innermost host op spanning its middle."""
    from types import SimpleNamespace as NS

    def op(name, start, end):
        return NS(name=name, time_range=NS(start=start, end=end))

    kernels = [(0, 10_000, "a"), (5_000, 20_000, "b"), (30_000, 40_000, "c"), (100_000, 110_000, "c")]
    cuts = [("forward", 0), ("backward", 35_000), ("optimizer", 105_000), ("after", 120_000)]
    host = [op("outer", 0, 150_000), op("aten::item", 60_000, 80_000)]
    r = probe.gpu_idle(kernels, (0, 150_000), cuts, host)
    assert r["idle_ms"] == 110.0  # gaps 20-30, 40-100 and 110-150 ms
    assert r["idle_by_segment_ms"] == {"forward": 10.0, "backward": 60.0, "optimizer": 10.0, "after": 30.0}
    assert r["idle_largest"] == [[60.0, "aten::item"], [40.0, "outer"], [10.0, "outer"]]
    assert (r["idle_gaps"], r["idle_before_kernel"]) == (3, [["c", 70.0, 2]])  # the trailing gap ends no kernel
    assert probe.gpu_idle([(0, 150_000, "a")], (0, 150_000), cuts)["idle_ms"] == 0


def test_verdicts_follow_the_measured_peak():
    v = probe.verdicts(70.0)
    assert v == {
        "24GB": "does not fit",
        "48GB": "does not fit",
        "80GB": "fits with headroom",
        "141GB": "fits with headroom",
    }
    assert probe.verdicts(75.0)["80GB"] == "fits"
    assert probe.verdicts(79.0)["80GB"] == "does not fit"


# ---------------------------------------------------------------------------------------------
# random weights created where they live (hunyuan/random_init.py)


@pytest.mark.parametrize(("moe_impl", "quantization"), [("fast", "nf4"), ("fast", "none"), ("upstream", "none")])
def test_random_model_of_the_stand_in_config(stand_in_dir, moe_impl, quantization):
    import torch

    from hunyuan_lora.hunyuan.random_init import build_random_model, real_or_folder_config
    from hunyuan_lora.scale import QUANT_SKIP_MODULES

    config, source = real_or_folder_config(stand_in_dir)
    assert source == str(stand_in_dir / "config.json")
    model, info = build_random_model(
        config,
        moe_impl=moe_impl,
        quantization=quantization,
        device="cpu",
        dtype=torch.float32,
        num_layers=1,
        model_dir=stand_in_dir,
        skip=QUANT_SKIP_MODULES,
    )
    assert len(model.model.layers) == info["layers"] == model.config.num_hidden_layers == 1
    assert model.config.moe_topk == config["moe_topk"][:1]
    assert info["layers_in_config"] == 2
    assert model.model.layers[0].mlp.moe_impl == moe_impl
    assert model.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32  # the router is never quantised
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the checkpoint
    folder_code = moe_impl == "upstream"
    assert type(model).__module__.startswith("hunyuan_lora.") is not folder_code
    assert info["code"].startswith("the model folder's own code") is folder_code
    if quantization == "nf4":
        # every Linear of the layer but the router: 4 attention + 3 shared + 8 experts x 3
        assert info["quantized_linears"] == 4 + 3 + 8 * 3
        assert model.is_loaded_in_4bit
        assert type(model.model.layers[0].mlp.experts[0].up_proj).__name__ == "Linear4bit"
    else:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, num_hidden_layers=1)
        got, want = model.state_dict(), reference.state_dict()
        assert list(got) == list(want)
        assert all(got[k].shape == want[k].shape for k in want)
        w = model.model.layers[0].self_attn.q_proj.weight
        assert 0.5 * config["initializer_range"] < w.std().item() < 2 * config["initializer_range"]


def test_random_model_of_the_real_architecture_on_meta():
    """The real Hunyuan-A13B config (no folder): real shapes, cut to 2 layers, the project's reference code."""
    import torch

    from hunyuan_lora.hunyuan.random_init import build_random_model, real_or_folder_config

    config, source = real_or_folder_config(None)
    assert "real Hunyuan-A13B" in source
    model, info = build_random_model(
        config, moe_impl="upstream", quantization="none", device="meta", dtype=torch.bfloat16, num_layers=2
    )
    assert "reference implementation" in info["code"]
    assert info["layers"] == 2
    experts = model.model.layers[1].mlp.experts
    assert len(experts) == 64
    assert experts[63].down_proj.weight.shape == (4096, 3072)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert per_layer == 2_495_881_472  # the real layer (hunyuan-a13b.md: 32 x 2,495,881,472 + embeddings)
