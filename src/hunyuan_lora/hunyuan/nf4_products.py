"""Grouped expert products straight from bitsandbytes' packed NF4 codes (Triton), without writing the
(E, out, in) dequantised weights to memory.

The layout is read as bitsandbytes stores it (nothing is repacked, so adapters and the NF4 cache do not
change): codes (E, out, in / 2) uint8, byte j of a row holding weight 2j in its high nibble and 2j + 1 in
its low one; scales (E, out, in / 64) float32, one per 64-value block (NF4Experts.scales: double-quantised
scales decoded once); table (16,) float32, the value of each code. A weight tile is decoded in registers
as bitsandbytes decodes it (table value times block scale in float32, rounded to the activations' dtype)
and multiplied with float32 accumulation, so a product equals dequantise-then-matmul up to the order of
the float32 sums. Even and odd input columns are multiplied separately (x[:, 0::2] with the high
nibbles, x[:, 1::2] with the low ones), so no decoded tile is interleaved. The 16 code values are looked up
in registers (tl.gather; grouped-nf4-gemm measured that faster than a per-element load of the table) or,
table_in_registers=False, from memory: bench/nf4_products_bench.py times both.

  forward         y[m] = x[m] @ W[e(m)]^T     (M, in) -> (M, out)
  input gradient  g[m] @ W[e(m)]              (M, out) -> (M, in)

Rows come sorted by expert, offs (E,) int32 holding each expert's end row (grouped_moe's convention). The
work is cut into tiles of BLOCK_M rows of one expert; each program finds its tile from offs itself (E
scalar steps), over a grid fixed by M alone (ceil(M / BLOCK_M) + E tiles, enough for any routing): one
launch per product, no host synchronisation, so a CUDA graph can capture it. Unused tiles return at once.

Selected by model.nf4_products: triton, or auto for few rows (fast_moe.set_nf4_products, NF4Experts.reads_codes).
Measured on one H200 by bench/nf4_products_bench.py (bench/results/nf4-products-2026-12-03.json): 2-5x faster
than dequantise-then-multiply up to 512 rows, 3.6x slower at a training step's 8,192.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # bitsandbytes' block size: one scale per row per step


def interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1): the kernels run on CPU tensors, which is how the tests check them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forward(
    x_ptr,
    codes_ptr,
    scales_ptr,
    table_ptr,
    out_ptr,
    offs_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
    stride_x,
    stride_ce,
    stride_cn,
    stride_se,
    stride_sn,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TABLE_IN_REGISTERS: tl.constexpr,
):
    tile = tl.program_id(0)
    # this program's tile: the tile-th of the experts' groups cut into BLOCK_M-row pieces, found by E scalar
    # steps over offs (no tile table to build: one launch per product)
    e = -1
    row0 = 0
    end = 0
    start = 0
    first = 0
    for i in range(E):
        stop = tl.load(offs_ptr + i)
        count = (stop - start + BLOCK_M - 1) // BLOCK_M
        hit = (tile >= first) & (tile < first + count)
        e = tl.where(hit, i, e)
        row0 = tl.where(hit, start + (tile - first) * BLOCK_M, row0)
        end = tl.where(hit, stop, end)
        first += count
        start = stop
    if e >= 0:
        rm = row0 + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        table = tl.broadcast_to(tl.load(table_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        half = tl.arange(0, BLOCK_K // 2)
        codes = codes_ptr + e.to(tl.int64) * stride_ce + rn.to(tl.int64)[:, None] * stride_cn + half[None, :]
        scales = scales_ptr + e.to(tl.int64) * stride_se + rn.to(tl.int64) * stride_sn
        xs = x_ptr + rm.to(tl.int64)[:, None] * stride_x + 2 * half[None, :]
        dtype = x_ptr.dtype.element_ty
        # tl.full, not tl.zeros: tl.zeros is itself a jitted helper, which the interpreter cannot call when
        # triton was imported before TRITON_INTERPRET was set (as in the tests)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k in range(0, K, BLOCK_K):
            b = tl.load(codes + k // 2, mask=n_ok[:, None], other=0).to(tl.int32)  # (BLOCK_N, BLOCK_K / 2)
            s = tl.load(scales + k // BLOCK_K, mask=n_ok, other=0.0)[:, None]
            if TABLE_IN_REGISTERS:
                w_hi = tl.gather(table, b >> 4, 1)  # weights k, k + 2, ...
                w_lo = tl.gather(table, b & 15, 1)  # weights k + 1, k + 3, ...
            else:
                w_hi = tl.load(table_ptr + (b >> 4))
                w_lo = tl.load(table_ptr + (b & 15))
            w_hi = (w_hi * s).to(dtype)
            w_lo = (w_lo * s).to(dtype)
            x_even = tl.load(xs + k, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K / 2)
            x_odd = tl.load(xs + k + 1, mask=m_ok[:, None], other=0.0)
            acc += tl.dot(x_even, tl.trans(w_hi))
            acc += tl.dot(x_odd, tl.trans(w_lo))
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :]
        tl.store(out, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


def _input_grad(
    g_ptr,
    codes_ptr,
    scales_ptr,
    table_ptr,
    out_ptr,
    offs_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
    stride_g,
    stride_ce,
    stride_cn,
    stride_se,
    stride_sn,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TABLE_IN_REGISTERS: tl.constexpr,
):
    # program (tile, block b of the input columns): out[rows, 64b : 64b + 64] = sum over n of g[rows, n] W[e, n, ...]
    tile = tl.program_id(0)
    # this program's tile: the tile-th of the experts' groups cut into BLOCK_M-row pieces, found by E scalar
    # steps over offs (no tile table to build: one launch per product)
    e = -1
    row0 = 0
    end = 0
    start = 0
    first = 0
    for i in range(E):
        stop = tl.load(offs_ptr + i)
        count = (stop - start + BLOCK_M - 1) // BLOCK_M
        hit = (tile >= first) & (tile < first + count)
        e = tl.where(hit, i, e)
        row0 = tl.where(hit, start + (tile - first) * BLOCK_M, row0)
        end = tl.where(hit, stop, end)
        first += count
        start = stop
    if e >= 0:
        rm = row0 + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        kb = tl.program_id(1)
        table = tl.broadcast_to(tl.load(table_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
        half = tl.arange(0, BLOCK_K // 2)
        rn0 = tl.arange(0, BLOCK_N)
        codes = codes_ptr + e.to(tl.int64) * stride_ce + kb * (BLOCK_K // 2) + half[None, :]
        scales = scales_ptr + e.to(tl.int64) * stride_se + kb
        gs = g_ptr + rm.to(tl.int64)[:, None] * stride_g
        dtype = g_ptr.dtype.element_ty
        acc_even = tl.full((BLOCK_M, BLOCK_K // 2), 0.0, tl.float32)
        acc_odd = tl.full((BLOCK_M, BLOCK_K // 2), 0.0, tl.float32)
        for n in range(0, N, BLOCK_N):
            rn = n + rn0
            n_ok = rn < N
            b = tl.load(codes + rn.to(tl.int64)[:, None] * stride_cn, mask=n_ok[:, None], other=0).to(tl.int32)
            s = tl.load(scales + rn.to(tl.int64) * stride_sn, mask=n_ok, other=0.0)[:, None]
            if TABLE_IN_REGISTERS:
                w_hi = tl.gather(table, b >> 4, 1)  # (BLOCK_N, BLOCK_K / 2): even input columns
                w_lo = tl.gather(table, b & 15, 1)
            else:
                w_hi = tl.load(table_ptr + (b >> 4))
                w_lo = tl.load(table_ptr + (b & 15))
            w_hi = (w_hi * s).to(dtype)
            w_lo = (w_lo * s).to(dtype)
            g = tl.load(gs + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
            acc_even += tl.dot(g, w_hi)
            acc_odd += tl.dot(g, w_lo)
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_out + kb * BLOCK_K + 2 * half[None, :]
        tl.store(out, acc_even.to(dtype), mask=m_ok[:, None])
        tl.store(out + 1, acc_odd.to(dtype), mask=m_ok[:, None])


def _dequantize(
    codes_ptr,
    scales_ptr,
    table_ptr,
    out_ptr,
    n_bytes,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TABLE_IN_REGISTERS: tl.constexpr,
):
    # program: ROWS 64-value blocks (32 bytes each); out[64 r + 2 j] from the high nibble of byte 32 r + j,
    # out[64 r + 2 j + 1] from its low one, each the table value times the block's scale in float32, rounded
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    half = tl.arange(0, BLOCK_K // 2)
    byte = block[:, None] * (BLOCK_K // 2) + half[None, :]  # (ROWS, 32)
    ok = byte < n_bytes
    b = tl.load(codes_ptr + byte, mask=ok, other=0).to(tl.int32)
    s = tl.load(scales_ptr + block, mask=block < n_bytes // (BLOCK_K // 2), other=0.0)[:, None]
    dtype = out_ptr.dtype.element_ty
    if TABLE_IN_REGISTERS:
        table = tl.broadcast_to(tl.load(table_ptr + tl.arange(0, 16))[None, :], (ROWS, 16))
        w_hi = (tl.gather(table, b >> 4, 1) * s).to(dtype)
        w_lo = (tl.gather(table, b & 15, 1) * s).to(dtype)
    else:
        w_hi = (tl.load(table_ptr + (b >> 4)) * s).to(dtype)
        w_lo = (tl.load(table_ptr + (b & 15)) * s).to(dtype)
    w = tl.reshape(tl.join(w_hi, w_lo), (ROWS, BLOCK_K))  # (ROWS, 32, 2) -> the 64 values in order
    value = block[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptr + value, w, mask=value < 2 * n_bytes)


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels, made on first use: Triton reads TRITON_INTERPRET when a kernel is made."""
    return triton.jit(_forward), triton.jit(_input_grad), triton.jit(_dequantize)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    shape: tuple,
    dtype: torch.dtype,
    rows: int = 128,
    num_warps: int = 4,
    table_in_registers: bool = True,
) -> torch.Tensor:
    """bitsandbytes' NF4 dequantisation in blocks of 64 (its layout, float32 block scales already decoded): codes
    (n / 2) uint8 in any shape, scales (n / 64,) float32, table (16,) -> a `shape` tensor of n values in `dtype`,
    bit for bit what `torch.ops.bitsandbytes.dequantize_4bit` writes (same float32 product, same rounding). One H200:
    0.51 ms for 64 experts' 3072 x 4096 weights against bitsandbytes' 0.84 ms, 3.96 against 2.40 TB/s; 128 blocks
    of 64 values per program and 4 warps were fastest (bench/nf4_dequant_bench.py, nf4-dequant-2026-12-03.json)."""
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    n_bytes = codes.numel()
    if out.numel() != 2 * n_bytes or scales.numel() * BLOCK_K != out.numel():
        raise ValueError(f"{n_bytes} code bytes and {scales.numel()} scales do not make {tuple(shape)}")
    *_, kernel = _kernels(interpreted())
    kernel[(triton.cdiv(scales.numel(), rows),)](
        codes,
        scales,
        table.to(codes.device),
        out,
        n_bytes,
        ROWS=rows,
        BLOCK_K=BLOCK_K,
        TABLE_IN_REGISTERS=table_in_registers,
        num_warps=num_warps,
    )
    return out


def tiles(rows: int, experts: int, block_m: int) -> int:
    """Programs along the rows: enough tiles of block_m rows of one expert for any routing of `rows` rows,
    sum over experts of ceil(rows_e / block_m) <= ceil(rows / block_m) + experts; the ones past the routing's
    own count find no expert and return."""
    return triton.cdiv(rows, block_m) + experts


def _block_m(rows: int, experts: int) -> int:
    """Rows per tile: tensor-core products take 16 at least; more rows share one decoded weight tile."""
    return 16 if rows <= 16 * experts else 32 if rows <= 32 * experts else 64


def _check(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> None:
    E, out_f, half = codes.shape
    if codes.dtype != torch.uint8 or scales.shape != (E, out_f, 2 * half // BLOCK_K) or offs.shape != (E,):
        raise ValueError(
            f"codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(scales.shape)}, offs "
            f"{tuple(offs.shape)}: expected (E, out, in / 2) uint8, (E, out, in / {BLOCK_K}), (E,)"
        )
    if a.stride(-1) != 1 or codes.stride(-1) != 1 or scales.stride(-1) != 1:
        raise ValueError("the activations, codes and scales must be contiguous along their last dimension")


def grouped_product(
    xs: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    offs: torch.Tensor,
    block_m: int | None = None,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    table_in_registers: bool = True,
) -> torch.Tensor:
    """xs (M, in) sorted by expert times each row's expert's W^T: (M, out), in xs's dtype. block_n 128: the
    fastest of the four tile shapes the bench tried at 128 and 512 rows (one H200, nf4-products-2026-12-03)."""
    _check(xs, codes, scales, offs)
    E, out_f, half = codes.shape
    M, in_f = xs.shape
    if in_f != 2 * half or in_f % BLOCK_K:
        raise ValueError(f"xs has {in_f} columns, the codes {2 * half}: both must match, a multiple of {BLOCK_K}")
    block_m = block_m or _block_m(M, E)
    out = torch.empty(M, out_f, dtype=xs.dtype, device=xs.device)
    if M == 0:
        return out
    forward, *_ = _kernels(interpreted())
    forward[(tiles(M, E, block_m), triton.cdiv(out_f, block_n))](
        xs,
        codes,
        scales,
        table,
        out,
        offs,
        E,
        in_f,
        out_f,
        xs.stride(0),
        codes.stride(0),
        codes.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
        TABLE_IN_REGISTERS=table_in_registers,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def grouped_input_grad(
    grad: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    offs: torch.Tensor,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    table_in_registers: bool = True,
) -> torch.Tensor:
    """grad (M, out) sorted by expert times each row's expert's W: (M, in), in grad's dtype."""
    _check(grad, codes, scales, offs)
    E, out_f, half = codes.shape
    M = grad.shape[0]
    if grad.shape[1] != out_f or (2 * half) % BLOCK_K:
        raise ValueError(f"grad has {grad.shape[1]} columns, the codes {out_f} rows")
    block_m = block_m or _block_m(M, E)
    out = torch.empty(M, 2 * half, dtype=grad.dtype, device=grad.device)
    if M == 0:
        return out
    _, input_grad, _ = _kernels(interpreted())
    input_grad[(tiles(M, E, block_m), 2 * half // BLOCK_K)](
        grad,
        codes,
        scales,
        table,
        out,
        offs,
        E,
        2 * half,
        out_f,
        grad.stride(0),
        codes.stride(0),
        codes.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
        TABLE_IN_REGISTERS=table_in_registers,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
