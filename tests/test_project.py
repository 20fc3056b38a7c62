"""Numerics of the low-rank projection ops and the low-rank weight gradient (dense and INT4/INT8 P)
against fastgrad/_reference.py."""

import pytest
import torch
from conftest import assert_close_report

from fastgrad import _reference as ref
from fastgrad import ops

pytestmark = pytest.mark.triton

# Relative Frobenius tolerances. Every backend accumulates in fp32; results differ only by the
# order of the K-term sums (K ≤ 300 here), whose rounding error is ~sqrt(K)·2^-24 ≈ 1e-6 in
# relative norm (TF32 is never used for fp32 inputs). bf16/fp16 outputs are rounded once to
# 8/11 mantissa bits (relative error ≤ 2^-9 / 2^-12), and a different summation order can flip
# that final rounding.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}

SHAPES = [(96, 160, 16), (160, 96, 24), (130, 70, 8)]  # (m, n, r): tall, wide, and odd sizes


def _p_shape(side, m, n, r):
    return (m, r) if side == "left" else (r, n)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_dense_projection_matches_reference(device, side, dtype, m, n, r):
    gen = torch.Generator().manual_seed(m + n + r)
    g = torch.randn(m, n, generator=gen).to(dtype).to(device)
    p = torch.randn(_p_shape(side, m, n, r), generator=gen).to(dtype).to(device)
    low = ops.lowrank_project(g, p, side)
    assert low.dtype == dtype and low.shape == ((r, n) if side == "left" else (m, r))
    assert_close_report(low.cpu(), ref.lowrank_project(g.cpu(), p.cpu(), side), RTOL[dtype], "project")
    back = ops.lowrank_project_back(low, p, side, 0.25)
    assert back.dtype == dtype and back.shape == (m, n)
    assert_close_report(back.cpu(), ref.lowrank_project_back(low.cpu(), p.cpu(), side, 0.25), RTOL[dtype], "back")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_quantized_projection_matches_dequantized_dense(device, side, bits, dtype, m, n, r):
    gen = torch.Generator().manual_seed(7 * m + r)
    g = torch.randn(m, n, generator=gen).to(dtype).to(device)
    p_dense = torch.linalg.qr(torch.randn(max(m, n), r, generator=gen))[0]
    p_dense = (p_dense[:m] if side == "left" else p_dense[:n].t()).contiguous().to(device)
    group = 8 if side == "left" else (16 if n % 16 == 0 else 14)  # along P's rows: r (left), n (right)
    q = ops.quantize(p_dense, bits, group)
    p_hat = q.dequantize(torch.float32).cpu()
    low = ops.lowrank_project(g, q, side)
    assert low.dtype == dtype
    assert_close_report(low.cpu(), ref.lowrank_project(g.cpu().float(), p_hat, side), RTOL[dtype], "project_q")
    back = ops.lowrank_project_back(low, q, side, 2.0)
    assert back.dtype == dtype and back.shape == (m, n)
    expected = ref.lowrank_project_back(low.cpu().float(), p_hat, side, 2.0)
    assert_close_report(back.cpu(), expected, RTOL[dtype], "project_back_q")


def test_projection_round_trip_recovers_in_subspace_gradient(device):
    # For orthonormal P and G inside span(P), back(down(G)) = G: checks the sides are consistent.
    m, n, r = 64, 48, 8
    basis = torch.linalg.qr(torch.randn(m, r))[0]
    g = (basis @ torch.randn(r, n)).to(device)
    p = basis.to(device)
    torch.testing.assert_close(
        ops.lowrank_project_back(ops.lowrank_project(g, p, "left"), p, "left"), g, atol=1e-5, rtol=1e-5
    )
    basis_r = torch.linalg.qr(torch.randn(n, r))[0].t().contiguous()
    g2 = (torch.randn(m, r) @ basis_r).to(device)
    p2 = basis_r.to(device)
    torch.testing.assert_close(
        ops.lowrank_project_back(ops.lowrank_project(g2, p2, "right"), p2, "right"), g2, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("p_kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_back_add_accumulates_in_place(device, side, p_kind, dtype, w_dtype):
    m, n, r = 130, 70, 8
    gen = torch.Generator().manual_seed(3)
    low = torch.randn((r, n) if side == "left" else (m, r), generator=gen).to(dtype).to(device)
    p = torch.randn(_p_shape(side, m, n, r), generator=gen).to(device)
    if p_kind == "dense":
        p_arg, p_hat = p.to(dtype), p.to(dtype).float()
    else:
        p_arg = ops.quantize(p, 8 if p_kind == "int8" else 4, 8 if side == "left" else 14)
        p_hat = p_arg.dequantize(torch.float32)
    w = torch.randn(m, n, generator=gen).to(w_dtype).to(device)
    expected = w.cpu().clone()
    ref.lowrank_project_back_add_(expected, low.cpu(), p_hat.cpu(), side, -0.5)
    ptr = w.data_ptr()
    out = ops.lowrank_project_back_add_(w, low, p_arg, side, -0.5)
    assert out is w and w.data_ptr() == ptr and w.dtype == w_dtype  # in place
    # One rounding of an fp32 sum to W's dtype; only the summation order of the K = r products
    # differs from the reference (see RTOL).
    assert_close_report(w.cpu(), expected, RTOL[w_dtype], "back_add")


# lowrank_grad: R = down(dyᵀ x, P) without G. Compared with projecting the full fp32 gradient.
# Exact math agrees; the two sides sum the T·m·n products in different orders and through a
# T×r intermediate (fp32), so fp32 results differ by ~sqrt(T + n)·2^-24 relative (1e-5 is ample).
# For bf16/fp16 inputs the backends may round the intermediate Z to the input dtype (Triton on a
# GPU does; see kernels/project.py) and round R once: two roundings of 2^-9 (bf16) / 2^-12 (fp16)
# on values whose relative size is O(1) after the fp32 sums, so 1.6e-2 / 2e-3.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("p_kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_lowrank_grad_equals_projected_full_gradient(device, side, p_kind, dtype, m, n, r):
    tokens = 3 * 37  # (batch, sequence) = (3, 37): leading dimensions are flattened
    gen = torch.Generator().manual_seed(m * n + r)
    dy = torch.randn(3, 37, m, generator=gen).to(dtype).to(device)
    x = torch.randn(3, 37, n, generator=gen).to(dtype).to(device)
    p = torch.randn(_p_shape(side, m, n, r), generator=gen)
    if p_kind == "dense":
        p_arg, p_hat = p.to(dtype).to(device), p.to(dtype).float()
    else:
        group = 8 if side == "left" else (16 if n % 16 == 0 else 14)
        p_arg = ops.quantize(p.to(device), 8 if p_kind == "int8" else 4, group)
        p_hat = p_arg.dequantize(torch.float32).cpu()
    full_g = dy.cpu().float().reshape(tokens, m).t() @ x.cpu().float().reshape(tokens, n)
    low = ops.lowrank_grad(dy, x, p_arg, side)
    assert low.dtype == dtype and low.shape == ((r, n) if side == "left" else (m, r))
    assert_close_report(low.cpu(), ref.lowrank_project(full_g, p_hat, side), GRAD_RTOL[dtype], "lowrank_grad")


def test_lowrank_grad_rejects_mismatched_leading_dimensions():
    with pytest.raises(ValueError, match="'dy' .* 'x' .* leading dimensions"):
        ops.lowrank_grad(torch.randn(2, 5, 8), torch.randn(10, 6), torch.randn(8, 2), "left")
