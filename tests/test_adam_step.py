"""The fused projected-Adam step (``fastgrad.ops.galore_adam_step_``): whichever kernel serves the
device (C++ on CPU; the Triton bodies in the TRITON_INTERPRET=1 pass) against the reference math,
its stochastic rounding of an INT8 weight, and the optimizers' use of it."""

import pytest
import torch
from conftest import assert_close_report

from fastgrad import _backends, ops
from fastgrad import _reference as ref

pytestmark = pytest.mark.triton

OPS = ("galore_adam_step_", "galore_adam_step_quantized_", "galore_adam_step_int8_")
# (beta1, beta2, eps, denom_scale, step_scale, decay): torch AdamW's ε placement at t = 3 with
# decoupled decay, so that every scalar is exercised with a value other than 1.
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, denom_scale=1 / (1 - 0.95**3) ** 0.5, step_scale=-2e-2, decay=0.999)
SHAPES = [(70, 40, 8), (33, 130, 6)]  # tall and wide, neither a multiple of any tile or block

# Tolerances. Moments: the same fp32 formula in every kernel, one rounding per operation; a
# kernel may contract a·b + c into an FMA, so 1e-6 relative (fp32) / one ulp of the storage dtype
# (bf16: 2^-8) after rounding. W: the update's K = r products summed in another order (fp32:
# ~r·2^-24 of |update|, far below 1e-6 of |W|), then one rounding to W's dtype (bf16: 2^-8).
MOMENT_RTOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
W_RTOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}


def _p_shape(side, m, n, r):
    return (m, r) if side == "left" else (r, n)


def _low_shape(side, m, n, r):
    return (r, n) if side == "left" else (m, r)


def _operands(side, m, n, r, p_kind, r_dtype=torch.float32, m_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(_low_shape(side, m, n, r), generator=gen).to(r_dtype)
    first = (0.3 * torch.randn(low.shape, generator=gen)).to(m_dtype)
    second = (0.1 * torch.rand(low.shape, generator=gen)).to(m_dtype)
    p = torch.randn(_p_shape(side, m, n, r), generator=gen) / r**0.5
    if p_kind == "dense":
        p_arg = p.to(r_dtype)
    else:
        row = p.shape[1]
        p_arg = ops.quantize(p, 8 if p_kind == "int8" else 4, row if row % 2 == 0 and row <= 64 else -1)
    return low, first, second, p_arg


def _dense_p(p_arg):
    return p_arg.dequantize(torch.float32) if isinstance(p_arg, ops.QuantizedTensor) else p_arg


def test_cpu_is_served_by_a_compiled_kernel():
    """The fast path runs: C++ on CPU (Triton's body under TRITON_INTERPRET=1), not the reference."""
    if _backends.extension_disabled():
        pytest.skip("FASTGRAD_NO_EXT=1: the reference serves by design")
    want = "triton-interpret" if _backends.triton_interpret() else "cpp"
    assert {op: _backends.SERVED_BY[op]["cpu"] for op in OPS} == dict.fromkeys(OPS, want)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("p_kind", ["dense", "int4", "int8"])
@pytest.mark.parametrize(("w_dtype", "m_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_float_weight_step_matches_reference(device, side, p_kind, w_dtype, m_dtype, m, n, r):
    low, first, second, p_arg = _operands(side, m, n, r, p_kind, m_dtype=m_dtype)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(w_dtype)
    want = [t.clone() for t in (w, first, second)]
    ref.galore_adam_step_(*want, low, _dense_p(p_arg), side, *HYPER.values())
    got = [t.to(device) for t in (w, first, second)]
    ptrs = [t.data_ptr() for t in got]
    p_dev = (
        p_arg.to(device)
        if isinstance(p_arg, torch.Tensor)
        else ops.QuantizedTensor(*(t.to(device) for t in p_arg[:3]), p_arg.bits)
    )
    ops.galore_adam_step_(*got, low.to(device), p_dev, side, **HYPER)
    assert [t.data_ptr() for t in got] == ptrs  # in place
    assert_close_report(got[1].cpu(), want[1], MOMENT_RTOL[m_dtype], "exp_avg")
    assert_close_report(got[2].cpu(), want[2], MOMENT_RTOL[m_dtype], "exp_avg_sq")
    assert_close_report(got[0].cpu(), want[0], W_RTOL[w_dtype], "w")
    # The update itself (not drowned by |W|): W_new − decay·W against the reference's.
    update = got[0].cpu().float() - HYPER["decay"] * w.float()
    want_update = want[0].float() - HYPER["decay"] * w.float()
    if w_dtype == torch.float32:
        assert_close_report(update, want_update, 1e-4, "update")


def _bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance between adjacent bf16 values around each |x| (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), torch.frexp(x.float().abs()).exponent - 8)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("p_kind", ["dense", "int4"])
def test_bf16_weight_step_is_the_reference_to_one_rounding(device, side, p_kind):
    """A bf16 W: the kernel and the reference form the same fp32 value up to the order of the r
    products of up(N, P) (~r·2^-24 relative), then round once to bf16, so each element is the
    reference's or its bf16 neighbour. The step is large (update ~0.5 against |W| ~1: about a
    hundred bf16 spacings) and the decay visible (5%: a few spacings), so this bound rejects an
    update wrong by half or a dropped decay, which the 4e-3 relative check of |W| cannot; both
    are checked as negative controls."""
    m, n, r = SHAPES[1]
    hyper = dict(HYPER, step_scale=-0.5, decay=0.95)
    low, first, second, p_arg = _operands(side, m, n, r, p_kind, m_dtype=torch.float32)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def reference(**change):
        out = [t.clone() for t in (w, first, second)]
        ref.galore_adam_step_(*out, low, _dense_p(p_arg), side, *dict(hyper, **change).values())
        return out[0].float()

    got = [t.to(device, copy=True) for t in (w, first, second)]  # the op works in place
    p_dev = p_arg.to(device) if isinstance(p_arg, torch.Tensor) else ops.QuantizedTensor(
        *(t.to(device) for t in p_arg[:3]), p_arg.bits
    )  # fmt: skip
    ops.galore_adam_step_(*got, low.to(device), p_dev, side, **hyper)
    w_new = got[0].cpu().float()
    want = reference()

    def within_one_rounding(expected: torch.Tensor) -> torch.Tensor:
        return ((w_new - expected).abs() <= _bf16_spacing(expected)).all()

    assert within_one_rounding(want), f"max |Δ| {(w_new - want).abs().max():.3g}"
    assert (w_new == want).float().mean() > 0.9  # a neighbour is the exception, not the rule
    assert not within_one_rounding(reference(step_scale=hyper["step_scale"] / 2)), "half the update passes"
    assert not within_one_rounding(reference(decay=1.0)), "a dropped decay passes"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("m", "n", "r", "group"), [(70, 254, 8, 127), (33, 130, 6, -1), (300, 64, 4, 32)])
def test_int8_weight_step_matches_reference(device, side, bits, m, n, r, group):
    """Codes equal the reference's wherever the fp32 updated weight agrees; the GEMM's summation
    order can move a value across a stochastic-rounding threshold (probability ~ 2^-24 · |update| /
    step per element), so ≥ 99.9% equal codes and every decoded value within one step."""
    low, first, second, p_arg = _operands(side, m, n, r, "int4" if bits == 4 else "int8")
    w = ops.quantize_int8(torch.randn(m, n, generator=torch.Generator().manual_seed(2)), group)
    want_w = [t.clone() for t in w[:3]]
    want_m = [first.clone(), second.clone()]
    args = (side, *HYPER.values(), True, 11, 5)
    ref.galore_adam_step_int8_(*want_w, *want_m, low, *p_arg[:3], p_arg.bits, *args)
    got_w = [t.to(device) for t in w[:3]]
    got_m = [first.to(device), second.to(device)]
    ops.galore_adam_step_(
        ops.QuantizedTensor(*got_w, 8), *got_m, low.to(device),
        ops.QuantizedTensor(*(t.to(device) for t in p_arg[:3]), p_arg.bits), side,
        **HYPER, stochastic=True, seed=11, offset=5,
    )  # fmt: skip
    assert_close_report(got_m[0].cpu(), want_m[0], MOMENT_RTOL[torch.float32], "exp_avg")
    assert_close_report(got_m[1].cpu(), want_m[1], MOMENT_RTOL[torch.float32], "exp_avg_sq")
    assert_close_report(got_w[1].cpu(), want_w[1], 1e-5, "w_scales")
    assert_close_report(got_w[2].cpu(), want_w[2], 1e-5, "w_zeros")
    same = (got_w[0].cpu() == want_w[0]).float().mean().item()
    assert same >= 0.999, f"only {same:.4%} of the codes equal the reference's"
    got_hat = ref.dequantize(*(t.cpu() for t in got_w), torch.float32)
    want_hat = ref.dequantize(*want_w, torch.float32)
    step = want_w[1].repeat_interleave(n // want_w[1].shape[1], dim=1)
    assert ((got_hat - want_hat).abs() <= step * 1.001 + 1e-6).all()


def test_int8_step_carries_updates_below_half_a_step_on_average():
    """An update of 1/10 of a quantization step survives stochastic rounding in expectation: the
    re-fitted range (scale, zero) is the same for every seed, and each code rounds up with the
    probability of its fraction, so over 64 seeds the mean decoded change is the fp32 change. The
    signed error averaged over all elements is checked against 4.5 standard errors (false failure
    probability < 1e-5), and the mean change must carry most of the fp32 change's energy."""
    m, n, r = 16, 64, 4
    low, first, second, p_arg = _operands("right", m, n, r, "int8")
    w0 = ops.quantize_int8(torch.randn(m, n, generator=torch.Generator().manual_seed(4)), 64)
    w0_hat = w0.dequantize()
    # Scale the step so that |Δ| ≈ step / 10 (the direction N is about ±1 per element after t = 1).
    zero_moments = [torch.zeros_like(first), torch.zeros_like(second)]
    n_dir = ref.adam_direction_(*[t.clone() for t in zero_moments], low, 0.9, 0.999, 1e-8, 1.0)
    up = n_dir @ _dense_p(p_arg)
    step_scale = 0.1 * w0.scales.mean().item() / up.abs().mean().item()
    fp32_change = step_scale * up
    hyper = dict(HYPER, step_scale=step_scale, decay=1.0, beta2=0.999, denom_scale=1.0)

    def run(stochastic, seed):
        w = ops.QuantizedTensor(w0.codes.clone(), w0.scales.clone(), w0.zeros.clone(), 8)
        moments = [t.clone() for t in zero_moments]
        ops.galore_adam_step_(w, *moments, low, p_arg, "right", **hyper, stochastic=stochastic, seed=seed)
        return w.dequantize() - w0_hat

    changes = torch.stack([run(True, s) for s in range(64)])
    mean_err = (changes.mean(0) - fp32_change).mean().abs()
    stderr = changes.std(0).mean() / (64 * m * n) ** 0.5
    assert mean_err < 4.5 * stderr + 1e-7, (mean_err.item(), stderr.item())
    assert (changes.mean(0) * fp32_change).sum() > 0.5 * (fp32_change**2).sum()  # points the right way


def test_int8_step_stream_depends_on_seed_and_offset():
    low, first, second, p_arg = _operands("left", 64, 48, 8, "int4")
    w0 = ops.quantize_int8(torch.randn(64, 48, generator=torch.Generator().manual_seed(5)), 16)

    def run(seed, offset):
        w = ops.QuantizedTensor(w0.codes.clone(), w0.scales.clone(), w0.zeros.clone(), 8)
        ops.galore_adam_step_(w, first.clone(), second.clone(), low, p_arg, "left", **HYPER, seed=seed, offset=offset)
        return w.codes

    assert torch.equal(run(1, 0), run(1, 0))
    assert not torch.equal(run(1, 0), run(2, 0))
    assert not torch.equal(run(1, 0), run(1, 48))


def test_public_function_rejects_a_quantized_weight_with_a_dense_projector():
    low, first, second, p_arg = _operands("right", 16, 32, 4, "dense")
    w = ops.quantize_int8(torch.randn(16, 32), 32)
    with pytest.raises(ValueError, match=r"galore_adam_step_: a quantized 'w' must be INT8.*quantized 'p'"):
        ops.galore_adam_step_(w, first, second, low, p_arg, "right", **HYPER)
