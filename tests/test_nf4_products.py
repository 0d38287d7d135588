"""Grouped products straight from the NF4 codes (hunyuan/nf4_products.py) against dequantise-then-matmul.

    .venv/bin/python -m pytest tests/test_nf4_products.py    # CPU: Triton's interpreter, float32
    GPU_TESTS=1: the CUDA tests below run the compiled kernels in bf16 (and under a CUDA graph)

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) in float32, where the decoded weight
is exactly bitsandbytes' float32 dequantisation and only the order of the sums differs: 1e-5. (The
interpreter's bf16 conversion is not round-to-nearest, so bf16 is checked on CUDA only.)
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from tensor_helpers import moe_forward_backward, rel
from test_nf4_moe import ALIGNED, lora_grads, peft_pair, tiny_config

from hunyuan_lora import config
from hunyuan_lora.errors import UserError
from hunyuan_lora.hunyuan import fast_moe, nf4_products
from hunyuan_lora.modeling import load_random_model
from hunyuan_lora.runtime import placement

REPO = Path(__file__).resolve().parents[1]


def quantised_experts(E: int, out_f: int, in_f: int, device: str = "cpu", seed: int = 0):
    """(codes (E, out, in/2), scales (E, out, in/64), table, W (E, out, in) float32 = bitsandbytes' dequantisation)."""
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(E, out_f, in_f, generator=g).to(device)
    qs = [bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False) for w in ws]
    codes = torch.stack([q.view(out_f, in_f // 2) for q, _ in qs])
    scales = torch.stack([s.absmax.view(out_f, in_f // 64) for _, s in qs])
    W = torch.stack([bnbf.dequantize_4bit(q, s) for q, s in qs])
    return codes, scales, qs[0][1].code.float(), W


def per_group(a: torch.Tensor, counts: list[int], fn) -> torch.Tensor:
    pieces, start = [], 0
    for e, n in enumerate(counts):
        pieces.append(fn(a[start : start + n], e))
        start += n
    return torch.cat(pieces)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def dequantised(monkeypatch) -> list:
    """The shape of every expert weight NF4Experts dequantises from here on, in order."""
    calls = []
    real = fast_moe.NF4Experts.materialize
    monkeypatch.setattr(fast_moe.NF4Experts, "materialize", lambda self: calls.append(self.shape) or real(self))
    return calls


@pytest.mark.parametrize("registers", [True, False])
@pytest.mark.parametrize("counts", [[5, 0, 19, 3], [0, 0, 33, 0], [1, 1, 1, 1], [0, 70, 0, 2]])
def test_products_equal_dequantise_then_matmul(interpreter, counts, registers):
    codes, scales, table, W = quantised_experts(len(counts), 48, 128)
    offs = torch.tensor(counts).cumsum(0).int()
    x = torch.randn(sum(counts), 128)
    y = nf4_products.grouped_product(x, codes, scales, table, offs, table_in_registers=registers)
    assert rel(y, per_group(x, counts, lambda a, e: a @ W[e].T)) < 1e-5
    g = torch.randn(sum(counts), 48)
    gx = nf4_products.grouped_input_grad(g, codes, scales, table, offs, table_in_registers=registers)
    assert rel(gx, per_group(g, counts, lambda a, e: a @ W[e])) < 1e-5


def test_fast_nf4_moe_reading_codes_matches_peft(interpreter, monkeypatch):
    """The whole MoE layer with nf4_products "triton": output, input gradient and every LoRA gradient equal
    PEFT's on Linear4bit, and no expert weight is ever dequantised."""
    config = tiny_config(**ALIGNED)
    ref, fast = peft_pair(config)
    assert fast_moe.set_nf4_products(fast, "triton") == config.num_hidden_layers
    monkeypatch.setattr(fast_moe.NF4Experts, "materialize", lambda self: pytest.fail("dequantised"))
    moe_ref = ref.base_model.model.model.layers[0].mlp
    moe_fast = fast.base_model.model.model.layers[0].mlp
    y_ref, y_fast, x_ref, x_fast = moe_forward_backward(moe_ref, moe_fast, 24, config.hidden_size)
    assert rel(y_fast, y_ref) < 1e-5
    assert rel(x_fast.grad, x_ref.grad) < 1e-5
    g_ref, g_fast = lora_grads(moe_ref), lora_grads(moe_fast)
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name


def test_default_still_dequantises(interpreter, dequantised):
    config = tiny_config(**ALIGNED)
    _, fast = peft_pair(config)
    moe = fast.base_model.model.model.layers[0].mlp
    calls = dequantised
    moe(torch.randn(1, 8, config.hidden_size))
    assert len(calls) == 3
    fast_moe.set_nf4_products(fast, "triton")  # switched on after the first forward: re-planned
    moe(torch.randn(1, 8, config.hidden_size))
    assert len(calls) == 3
    fast_moe.set_nf4_products(fast, "dequantize")
    moe(torch.randn(1, 8, config.hidden_size))
    assert len(calls) == 6


def test_auto_reads_codes_for_few_rows_only(interpreter, monkeypatch, dequantised):
    """nf4_products "auto": a decoding-sized product multiplies from the codes, a training-sized one dequantises
    (CODES_MAX_ROWS scaled down to the tiny model: 8 tokens x top-k rows per projection)."""
    config = tiny_config(**ALIGNED)
    _, fast = peft_pair(config)
    moe = fast.base_model.model.model.layers[0].mlp
    calls = dequantised
    fast_moe.set_nf4_products(fast, "auto")
    x = torch.randn(1, 8, config.hidden_size)
    rows = 8 * config.moe_topk[0]
    monkeypatch.setattr(fast_moe, "CODES_MAX_ROWS", rows)
    few = moe(x)
    assert calls == []
    monkeypatch.setattr(fast_moe, "CODES_MAX_ROWS", rows - 1)
    many = moe(x)
    assert len(calls) == 3
    assert rel(few, many) < 1e-5


def test_config_switch_reaches_the_model(interpreter, dequantised, stand_in_dir, tmp_path):
    """model.nf4_products: triton in the QLoRA config: the loaded model's experts multiply from the codes where
    the shapes allow (the stand-in's gate/up, 64 inputs; its down has 48, not whole 64-value blocks)."""
    cfg = config.load(
        REPO / "configs/huanhuan_qlora.yaml",
        ["model.device=cpu", "model.device_map=null", "model.nf4_products=triton"],
        model_dir=str(stand_in_dir),
        output_dir=str(tmp_path / "run"),
    )
    model = load_random_model(cfg, placement(cfg), 1).model
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 6)))
    assert dequantised == [(8, 64, 48)]  # down only


def test_config_refuses_nf4_products_without_nf4(stand_in_dir, tmp_path):
    with pytest.raises(UserError, match="model.nf4_products: triton needs model.quantization: nf4"):
        config.load(
            REPO / "configs/huanhuan_fast.yaml",
            ["model.nf4_products=triton"],
            model_dir=str(stand_in_dir),
            output_dir=str(tmp_path / "run"),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 512, 4096])
def test_cuda_bf16_products_and_graph_capture(rows):
    """The compiled kernels in bf16 at a model-like width against bitsandbytes' bf16 dequantisation + matmul,
    eagerly and replayed from a CUDA graph (static tile table, no host synchronisation)."""
    E, out_f, in_f = 16, 384, 512
    codes, scales, table, W = quantised_experts(E, out_f, in_f, device="cuda")
    Wb = W.to(torch.bfloat16).float()
    experts = torch.randint(0, E, (rows,), device="cuda")
    counts = torch.bincount(experts, minlength=E)
    offs = counts.cumsum(0).int()
    x = torch.randn(rows, in_f, device="cuda").to(torch.bfloat16)
    g = torch.randn(rows, out_f, device="cuda").to(torch.bfloat16)
    want_y = per_group(x.float(), counts.tolist(), lambda a, e: a @ Wb[e].T)
    want_g = per_group(g.float(), counts.tolist(), lambda a, e: a @ Wb[e])
    for registers in (True, False):
        y = nf4_products.grouped_product(x, codes, scales, table, offs, table_in_registers=registers)
        gx = nf4_products.grouped_input_grad(g, codes, scales, table, offs, table_in_registers=registers)
        assert rel(y.float(), want_y) < 1e-2
        assert rel(gx.float(), want_g) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = nf4_products.grouped_product(x, codes, scales, table, offs)
    x.copy_(torch.randn_like(x))
    graph.replay()
    want_y = per_group(x.float(), counts.tolist(), lambda a, e: a @ Wb[e].T)
    assert rel(y_graph.float(), want_y) < 1e-2


def test_dequantize_is_bitsandbytes_dequantisation(interpreter):
    """nf4_products.dequantize in float32 under the interpreter: bitsandbytes' values exactly, also where the last
    program has fewer blocks than it could take (96 blocks in programs of 32... and of 64)."""
    codes, scales, table, W = quantised_experts(3, 16, 128)
    for rows in (32, 64):
        got = nf4_products.dequantize(codes.reshape(-1, 1), scales.reshape(-1), table, W.shape, torch.float32, rows)
        assert torch.equal(got, W)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_dequantize_writes_bitsandbytes_bits(dtype, monkeypatch):
    """The Triton dequantisation the fast path uses on CUDA writes the very bits of bitsandbytes' op (random codes
    and scales, a shape whose last program is partial), and fast_moe.dequantize_4bit takes it unless told not to."""
    shape = (5, 96, 192)  # 1,440 blocks: the last program (128 blocks each) is partial
    n = 5 * 96 * 192
    codes = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device="cuda")
    scales = torch.rand(n // 64, device="cuda") * 3
    table = bnbf.get_4bit_type("nf4", device="cuda").float()
    want = torch.ops.bitsandbytes.dequantize_4bit.default(codes, scales, 64, "nf4", list(shape), dtype)
    assert torch.equal(nf4_products.dequantize(codes, scales, table, shape, dtype), want)
    calls = []
    real = nf4_products.dequantize
    monkeypatch.setattr(nf4_products, "dequantize", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert torch.equal(fast_moe.dequantize_4bit(codes, scales, 64, "nf4", shape, dtype, table), want)
    monkeypatch.setenv("HUNYUAN_NF4_DEQUANT", "bitsandbytes")
    assert torch.equal(fast_moe.dequantize_4bit(codes, scales, 64, "nf4", shape, dtype, table), want)
    assert len(calls) == 1
