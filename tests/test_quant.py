"""Numerics of the quantizers and of bf16 stochastic rounding, against fastgrad/_reference.py.

Backend-agnostic: tests whichever kernel serves each device (C++ on CPU normally, the Triton
bodies on CPU when CI re-runs this file under TRITON_INTERPRET=1).
"""

import math

import pytest
import torch

from fastgrad import _reference as ref
from fastgrad import ops

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize_ref(x, bits, group_size, symmetric, stochastic, seed, offset):
    fn = ref.quantize_int8 if bits == 8 else ref.quantize_int4
    return fn(x.cpu(), -1 if group_size is None else group_size, symmetric, stochastic, seed, offset)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize(("shape", "group_size"), [((6, 96), 32), ((5, 40), None), ((3, 2, 64), 64), ((192,), 48)])
def test_codes_identical_to_reference(device, bits, dtype, symmetric, stochastic, shape, group_size):
    # Identical codes (not "close"): every backend uses the same Philox stream and correctly
    # rounded fp32 arithmetic, so there is nothing to be tolerant about.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype).to(device)
    q = ops.quantize(x, bits, group_size, symmetric=symmetric, stochastic=stochastic, seed=1234, offset=99)
    codes, scales, zeros = _quantize_ref(x, bits, group_size, symmetric, stochastic, 1234, 99)
    assert q.codes.dtype == torch.uint8
    assert torch.equal(q.codes.cpu(), codes)
    assert torch.equal(q.scales.cpu(), scales)
    assert torch.equal(q.zeros.cpu(), zeros)
    deq = q.dequantize(dtype)
    assert deq.dtype == dtype and deq.shape == x.shape
    expected = ref.dequantize(ref.unpack_int4(codes) if bits == 4 else codes, scales, zeros, dtype)
    # fp32 dequant is code*scale + zero; a GPU may contract it to one FMA: 1 ulp of the result.
    torch.testing.assert_close(deq.cpu(), expected, rtol=2**-23 if dtype == torch.float32 else 0, atol=1e-30)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_a_step(device, bits, symmetric):
    x = torch.randn(8, 256, device=device) * torch.logspace(-3, 3, 8, device=device)[:, None]
    for stochastic, bound in ((False, 0.5), (True, 1.0)):
        q = ops.quantize(x, bits, 64, symmetric=symmetric, stochastic=stochastic, seed=7)
        err = (q.dequantize() - x).abs().reshape(8, 4, 64)
        step = q.scales.unsqueeze(-1)
        # RTN is off by at most half a step, SR by less than one step (plus fp32 rounding).
        assert (err <= step * (bound + 1e-4)).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_single_sign_groups_are_not_clipped(device, bits):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, -3.0, -2.0, -1.0], [5.0, 5.0, 5.0, 5.0]], device=device)
    q = ops.quantize(x, bits, None)
    # The asymmetric range [min, max] always holds the group; [1, 2, 3, 4] at 4 bits (step 0.2)
    # comes back within half a step, not clipped to 3 as with an integer zero point in [0, 15].
    assert (q.dequantize() - x).abs().max() <= q.scales.max() / 2 * (1 + 1e-5)
    torch.testing.assert_close(q.dequantize()[2], x[2], rtol=0, atol=0)  # constant group: exact


def test_int4_storage_is_half_a_byte_per_value(device):
    x = torch.randn(64, 512, device=device)
    q = ops.quantize_int4(x, 128)
    assert q.codes.shape == (64, 256) and q.codes.numel() == x.numel() // 2
    assert q.shape == x.shape and q.group_size == 128
    assert q.nbytes == x.numel() // 2 + 2 * 4 * (x.numel() // 128)
    assert torch.equal(ref.pack_int4(ref.unpack_int4(q.codes.cpu())), q.codes.cpu())


@pytest.mark.parametrize("bits", [8, 4])
def test_same_seed_same_codes_other_seed_other_codes(device, bits):
    x = torch.randn(16, 256, device=device)
    a = ops.quantize(x, bits, 128, stochastic=True, seed=11, offset=5)
    b = ops.quantize(x, bits, 128, stochastic=True, seed=11, offset=5)
    c = ops.quantize(x, bits, 128, stochastic=True, seed=12, offset=5)
    d = ops.quantize(x, bits, 128, stochastic=True, seed=11, offset=6)
    assert torch.equal(a.codes, b.codes)
    # With generic fractions each element agrees with probability <= 1 - 2f(1-f) < 1, so 4096
    # elements all agreeing by chance has probability far below 1e-100.
    assert not torch.equal(a.codes, c.codes)
    assert not torch.equal(a.codes, d.codes)


def test_offset_addresses_the_stream_by_element(device):
    # Element i uses counter offset + i: quantizing rows 3.. with offset 3·n reproduces the codes
    # of the whole tensor, for per-row groups. This is what lets a sharded or chunked caller
    # continue one stream.
    x = torch.randn(8, 96, device=device)
    whole = ops.quantize_int8(x, None, stochastic=True, seed=3, offset=1000)
    part = ops.quantize_int8(x[3:].contiguous(), None, stochastic=True, seed=3, offset=1000 + 3 * 96)
    assert torch.equal(whole.codes[3:], part.codes)
    y = torch.randn(1000, device=device)
    assert torch.equal(
        ops.round_bf16_stochastic(y, 9, 0)[100:].view(torch.int16),
        ops.round_bf16_stochastic(y[100:].contiguous(), 9, 100).view(torch.int16),
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_offsets_beyond_32_bits(device, bits):
    x = torch.randn(4, 64, device=device)
    offset = 2**34 - 100  # the counters (positions / 4) cross the 32-bit boundary inside the tensor
    q = ops.quantize(x, bits, 32, stochastic=True, seed=2**40 + 5, offset=offset)
    codes, _, _ = _quantize_ref(x, bits, 32, False, True, 2**40 + 5, offset)
    assert torch.equal(q.codes.cpu(), codes)
    q_far = ops.quantize(x, bits, 32, stochastic=True, seed=1, offset=3 * 2**33)
    assert torch.equal(q_far.codes.cpu(), _quantize_ref(x, bits, 32, False, True, 1, 3 * 2**33)[0])


def _grid_group(levels: int, n: int, frac: float, device) -> torch.Tensor:
    """One group whose min is 0 and max is `levels` (so scale = 1, zero = 0 at b bits) and whose
    other n - 2 values sit `frac` of a step above an integer grid point."""
    body = torch.arange(n - 2, device=device) % (levels - 1) + 1 + frac
    return torch.cat([torch.tensor([0.0, float(levels)], device=device), body.float()])


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_and_rtn_is_not(device, bits):
    qmax = 2**bits - 1
    n, draws = 4096, 256
    x = _grid_group(qmax, n, 0.3, device)[None, :]
    errs = torch.stack(
        [ops.quantize(x, bits, None, stochastic=True, seed=17, offset=k * n).dequantize() - x for k in range(draws)]
    )[:, 0, 2:]
    # Errors are in (-1, 1) steps (scale is 1), independent across elements and draws, mean 0
    # if SR is unbiased. Hoeffding over M = 4094·256 ≈ 1.05e6 samples: P(|mean| ≥ 0.01) ≤
    # 2·exp(-M·0.01²/2) ≈ 3e-23, the false-failure probability of this assertion.
    assert abs(errs.mean().item()) < 0.01
    # Each element rounds up with probability 0.3 (its fraction): the round-up rate is 0.3.
    assert abs((errs > 0).float().mean().item() - 0.3) < 0.01
    rtn = ops.quantize(x, bits, None).dequantize() - x
    assert torch.allclose(rtn[0, 2:], torch.full_like(rtn[0, 2:], -0.3), atol=1e-5)  # RTN: biased by -0.3


def test_stochastic_rounding_carries_updates_below_half_a_step(device):
    # 100 updates of +0.1 step each, re-quantized every time. RTN loses every one of them (each is
    # below half a step); SR keeps them in expectation. Azuma over N = 16384 elements × 100 steps
    # with increments in [-1, 1]: P(|mean error| ≥ 1) ≤ 2·exp(-N/(2·100)) ≈ 3e-36.
    n, steps, delta = 16384, 100, 0.1
    x0 = torch.cat([torch.tensor([0.0, 255.0]), torch.full((n,), 100.0)]).to(device)[None, :]
    sr, rtn = x0.clone(), x0.clone()
    for k in range(steps):
        sr = ops.quantize_int8(sr + delta * (x0 == 100), None, stochastic=True, seed=5, offset=k * x0.numel())
        sr = sr.dequantize()
        rtn = ops.quantize_int8(rtn + delta * (x0 == 100), None).dequantize()
    assert torch.all(rtn[0, 2:] == 100.0)
    assert abs(sr[0, 2:].mean().item() - (100 + steps * delta)) < 1.0


def test_round_bf16_stochastic_matches_reference_and_is_unbiased(device):
    x = (torch.randn(5, 4097) * 1e3).to(device)
    out = ops.round_bf16_stochastic(x, 21, 2**35 + 1)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out.cpu().view(torch.int16), ref.round_bf16_stochastic(x.cpu(), 21, 2**35 + 1).view(torch.int16))
    # Each result is one of the two bf16 neighbours of x: x truncated toward zero, or the next
    # bf16 away from zero.
    bits = x.cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    toward_zero = (bits & 0xFFFF0000).to(torch.uint32).view(torch.int32).view(torch.float32)
    away = ((bits & 0xFFFF0000) + 0x10000).to(torch.uint32).view(torch.int32).view(torch.float32)
    got = out.cpu().float()
    assert ((got == toward_zero) | (got == away)).all()
    # Unbiasedness: 1 + 2^-10 lies 1/8 of a bf16 step (2^-7) above 1.0, which round-to-nearest
    # always loses. Errors in steps are in (-1, 1), independent per element; Hoeffding over
    # M = 2^20 draws: P(|mean| ≥ 0.01) ≤ 2·exp(-2^20·0.01²/2) ≈ 3e-23.
    v = torch.full((2**20,), 1.0 + 2**-10, device=device)
    err_steps = (ops.round_bf16_stochastic(v, 4, 0).float() - v) / 2**-7
    assert abs(err_steps.mean().item()) < 0.01
    assert (v.to(torch.bfloat16).float() == 1.0).all()


def test_round_bf16_special_values(device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -2.5], device=device)
    out = ops.round_bf16_stochastic(x, 1, 0).float()
    assert math.isnan(out[0].item())
    # NaNs whose payload sits only in the low 16 bits (lost by truncation) must stay NaN, not
    # become infinities.
    payload_nans = torch.tensor([0x7F800001, 0xFF800001, 0x7F80FFFF], dtype=torch.int64)
    payload_nans = payload_nans.to(torch.uint32).view(torch.int32).view(torch.float32).to(device)
    assert torch.isnan(ops.round_bf16_stochastic(payload_nans, 1, 0)).all()
    assert out[1:].tolist() == [float("inf"), -float("inf"), 0.0, -0.0, 1.0, -2.5]
    assert math.copysign(1.0, out[4].item()) == -1.0
