"""The op contract: opcheck on every op and device, fake kernels, and bad-input errors that name
the op and the argument before any kernel runs."""

import pytest
import torch

import fastgrad
from fastgrad import _backends, ops
from fastgrad._ops import SCHEMAS

pytestmark = pytest.mark.triton


# beta1, beta2, eps, denom_scale, step_scale, decay of the fused Adam step ops
_HYPER = (0.9, 0.999, 1e-6, 1.0, -0.01, 0.999)


def _moments(rows, cols, device, dtype=torch.float32):
    """Adam moments M, V (V ≥ 0) of an R of shape (rows, cols)."""
    return torch.randn(rows, cols, device=device).to(dtype), torch.rand(rows, cols, device=device).to(dtype)


def _samples(device):
    """One valid argument tuple per op."""
    x = torch.randn(4, 64, device=device)
    q8 = ops.quantize_int8(x, 32)
    q4 = ops.quantize_int4(x, 32)
    g = torch.randn(48, 40, device=device)
    p_left = torch.randn(48, 8, device=device)
    p_right = torch.randn(8, 40, device=device)
    q4_right = ops.quantize_int4(p_right, 8)
    q8_left = ops.quantize_int8(p_left, 8)
    q8_w = ops.quantize_int8(g, 20)
    return {
        "quantize_int8": [(x, 32, False, True, 3, 5), (x, -1, True, False, 0, 0)],
        "dequantize_int8": [(q8.codes, q8.scales, q8.zeros, torch.bfloat16)],
        "quantize_int4": [(x, 32, True, True, 3, 5), (x, -1, False, False, 0, 0)],
        "dequantize_int4": [(q4.codes, q4.scales, q4.zeros, torch.float32)],
        "round_bf16_stochastic": [(x, 1, 2)],
        "lowrank_project": [(g, p_left, "left"), (g, p_right, "right")],
        "lowrank_project_back": [(torch.randn(8, 40, device=device), p_left, "left", 0.5)],
        "lowrank_project_quantized": [
            (g, q4_right.codes, q4_right.scales, q4_right.zeros, 4, "right"),
            (g, q8_left.codes, q8_left.scales, q8_left.zeros, 8, "left"),
        ],
        "lowrank_project_back_quantized": [
            (torch.randn(48, 8, device=device), q4_right.codes, q4_right.scales, q4_right.zeros, 4, "right", 2.0),
        ],
        "lowrank_project_back_add_": [
            (torch.randn(48, 40, device=device), torch.randn(8, 40, device=device), p_left, "left", 0.5),
            (
                torch.randn(48, 40, device=device, dtype=torch.bfloat16),
                torch.randn(48, 8, device=device),
                p_right,
                "right",
                1.0,
            ),
        ],
        "lowrank_grad": [
            (torch.randn(30, 48, device=device), torch.randn(30, 40, device=device), p_left, "left"),
            (
                torch.randn(30, 48, device=device, dtype=torch.bfloat16),
                torch.randn(30, 40, device=device, dtype=torch.bfloat16),
                p_right.bfloat16(),
                "right",
            ),
        ],
        "lowrank_grad_quantized": [
            (torch.randn(30, 48, device=device), torch.randn(30, 40, device=device), *q4_right[:3], 4, "right"),
            (torch.randn(30, 48, device=device), torch.randn(30, 40, device=device), *q8_left[:3], 8, "left"),
        ],
        "galore_adam_step_": [
            (g.clone(), *_moments(8, 40, device), torch.randn(8, 40, device=device), p_left, "left", *_HYPER),
            (
                g.bfloat16(),
                *_moments(48, 8, device, torch.bfloat16),
                torch.randn(48, 8, device=device),
                p_right,
                "right",
                *_HYPER,
            ),
        ],
        "galore_adam_step_quantized_": [
            (
                g.clone(),
                *_moments(48, 8, device),
                torch.randn(48, 8, device=device),
                *q4_right[:3],
                4,
                "right",
                *_HYPER,
            ),
            (g.clone(), *_moments(8, 40, device), torch.randn(8, 40, device=device), *q8_left[:3], 8, "left", *_HYPER),
        ],
        "galore_adam_step_int8_": [
            (
                *q8_w[:3],
                *_moments(48, 8, device),
                torch.randn(48, 8, device=device),
                *q4_right[:3],
                4,
                "right",
                *_HYPER,
                True,
                7,
                9,
            ),  # fmt: skip
            (
                *q8_w[:3],
                *_moments(8, 40, device),
                torch.randn(8, 40, device=device),
                *q8_left[:3],
                8,
                "left",
                *_HYPER,
                False,
                0,
                0,
            ),  # fmt: skip
        ],
        "newton_schulz": [
            (torch.randn(16, 40, device=device), [3.4445, -4.775, 2.0315] * 2, 1e-7),
            (torch.randn(3, 40, 16, device=device).bfloat16(), [3.4445, -4.775, 2.0315, 1.5, -0.5, 0.0], 1e-3),
        ],
        "lowrank_project_back_quantized_add_": [
            (
                g.clone(),
                torch.randn(48, 8, device=device),
                q4_right.codes,
                q4_right.scales,
                q4_right.zeros,
                4,
                "right",
                -1.0,
            ),
        ],
    }


def test_every_op_has_samples():
    assert set(_samples("cpu")) == set(SCHEMAS)


@pytest.mark.parametrize("op", list(SCHEMAS))
def test_opcheck(device, op):
    for args in _samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.fastgrad, op).default, args)


@pytest.mark.parametrize("op", list(SCHEMAS))
def test_fake_kernel_shapes_match_real(op):
    for args in _samples("cpu")[op]:
        real = getattr(torch.ops.fastgrad, op)(*args)
        meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        fake = getattr(torch.ops.fastgrad, op)(*meta_args)
        if real is None:  # a mutating op: its fake only checks the arguments
            assert fake is None
            continue
        real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
        for r, f in zip(real, fake, strict=True):
            assert f.shape == r.shape and f.dtype == r.dtype


def _bad_calls():
    x = torch.randn(4, 64)
    q8 = ops.quantize_int8(x, 32)
    q4 = ops.quantize_int4(x, 32)
    g = torch.randn(48, 40)
    p_left = torch.randn(48, 8)
    F = torch.ops.fastgrad
    low_left = torch.randn(8, 40)
    dy, xin = torch.randn(30, 48), torch.randn(30, 40)
    q8_left = ops.quantize_int8(p_left, 8)
    q8_w = ops.quantize_int8(g, 20)
    m8, v8 = _moments(8, 40, "cpu")

    def adam_step(w=None, m=m8, v=v8, low=low_left, side="left", hyper=_HYPER):
        """galore_adam_step_ with valid arguments but those given."""
        return F.galore_adam_step_(g.clone() if w is None else w, m, v, low, p_left, side, *hyper)

    def int8_step(w=q8_w[:3], bits=8, offset=0):
        """galore_adam_step_int8_ with valid arguments but those given."""
        return F.galore_adam_step_int8_(*w, m8, v8, low_left, *q8_left[:3], bits, "left", *_HYPER, True, 0, offset)

    return [
        ("lowrank_grad", "x", lambda: F.lowrank_grad(dy, xin[:29], p_left, "left")),  # token counts differ
        ("lowrank_grad", "x", lambda: F.lowrank_grad(dy, xin.double(), p_left, "left")),
        ("lowrank_grad", "dy", lambda: F.lowrank_grad(dy.int(), xin, p_left, "left")),
        ("lowrank_grad", "dy", lambda: F.lowrank_grad(dy[None], xin, p_left, "left")),
        ("lowrank_grad", "p", lambda: F.lowrank_grad(dy, xin, p_left[:40], "left")),
        ("lowrank_grad", "p", lambda: F.lowrank_grad(dy, xin, torch.randn(8, 48), "right")),  # P of the other side
        ("lowrank_grad", "p", lambda: F.lowrank_grad(dy, xin, p_left.bfloat16(), "left")),
        ("lowrank_grad", "side", lambda: F.lowrank_grad(dy, xin, p_left, "both")),
        ("lowrank_grad_quantized", "p", lambda: F.lowrank_grad_quantized(dy, xin, *q8_left[:3], 8, "right")),
        ("lowrank_grad_quantized", "bits", lambda: F.lowrank_grad_quantized(dy, xin, *q8_left[:3], 3, "left")),
        (
            "lowrank_project_back_add_",
            "w",
            lambda: F.lowrank_project_back_add_(torch.randn(48, 41), low_left, p_left, "left", 1.0),
        ),
        (
            "lowrank_project_back_add_",
            "w",
            lambda: F.lowrank_project_back_add_(torch.zeros(48, 40, dtype=torch.int32), low_left, p_left, "left", 1.0),
        ),
        (
            "lowrank_project_back_add_",
            "p",
            lambda: F.lowrank_project_back_add_(torch.randn(48, 40), low_left, p_left[:, :4], "left", 1.0),
        ),
        (
            "lowrank_project_back_quantized_add_",
            "w",
            lambda: F.lowrank_project_back_quantized_add_(
                torch.randn(4, 41), torch.randn(64, 40), q8.codes, q8.scales, q8.zeros, 8, "left", 1.0
            ),
        ),
        ("galore_adam_step_", "exp_avg", lambda: adam_step(m=m8[:, :39])),
        ("galore_adam_step_", "exp_avg_sq", lambda: adam_step(v=v8.bfloat16())),
        ("galore_adam_step_", "exp_avg", lambda: adam_step(m=m8.t().contiguous().t())),
        ("galore_adam_step_", "r", lambda: adam_step(low=low_left.t().contiguous().t())),
        ("galore_adam_step_", "w", lambda: adam_step(w=g[:, :39].clone())),
        ("galore_adam_step_", "p", lambda: adam_step(side="right")),
        ("galore_adam_step_", "beta1", lambda: adam_step(hyper=(1.0, 0.999, 1e-6, 1.0, -0.01, 1.0))),
        ("galore_adam_step_", "beta2", lambda: adam_step(hyper=(0.9, -0.1, 1e-6, 1.0, -0.01, 1.0))),
        ("galore_adam_step_", "eps", lambda: adam_step(hyper=(0.9, 0.999, float("nan"), 1.0, -0.01, 1.0))),
        ("galore_adam_step_", "denom_scale", lambda: adam_step(hyper=(0.9, 0.999, 1e-6, 0.0, -0.01, 1.0))),
        (
            "galore_adam_step_quantized_",
            "w",
            lambda: F.galore_adam_step_quantized_(
                torch.randn(48, 41), m8, v8, low_left, *q8_left[:3], 8, "left", *_HYPER
            ),
        ),
        ("galore_adam_step_int8_", "w_codes", lambda: int8_step(w=ops.quantize_int8(torch.randn(48, 48), 8)[:3])),
        ("galore_adam_step_int8_", "w_scales", lambda: int8_step(w=(q8_w.codes, torch.ones(48, 3), torch.ones(48, 3)))),
        ("galore_adam_step_int8_", "offset", lambda: int8_step(offset=-1)),
        ("galore_adam_step_int8_", "bits", lambda: int8_step(bits=2)),
        ("quantize_int8", "x", lambda: F.quantize_int8(x.to(torch.float64), 32, False, False, 0, 0)),
        ("quantize_int8", "x", lambda: F.quantize_int8(x.t(), 4, False, False, 0, 0)),  # non-contiguous
        ("quantize_int8", "group_size", lambda: F.quantize_int8(x, 48, False, False, 0, 0)),
        ("quantize_int8", "group_size", lambda: F.quantize_int8(x, 0, False, False, 0, 0)),
        ("quantize_int8", "seed", lambda: F.quantize_int8(x, 32, False, True, -1, 0)),
        ("quantize_int8", "offset", lambda: F.quantize_int8(x, 32, False, True, 0, -5)),
        ("quantize_int4", "group_size", lambda: F.quantize_int4(torch.randn(4, 63), 7, False, False, 0, 0)),
        (
            "dequantize_int8",
            "codes",
            lambda: F.dequantize_int8(q8.codes.to(torch.int32), q8.scales, q8.zeros, torch.float32),
        ),
        ("dequantize_int8", "scales", lambda: F.dequantize_int8(q8.codes, q8.scales.double(), q8.zeros, torch.float32)),
        ("dequantize_int8", "zeros", lambda: F.dequantize_int8(q8.codes, q8.scales, q8.zeros[:, :1], torch.float32)),
        (
            "dequantize_int8",
            "scales",
            lambda: F.dequantize_int8(q8.codes, torch.ones(4, 5), torch.ones(4, 5), torch.float32),
        ),
        ("dequantize_int8", "dtype", lambda: F.dequantize_int8(q8.codes, q8.scales, q8.zeros, torch.int32)),
        (
            "dequantize_int4",
            "scales",
            lambda: F.dequantize_int4(q4.codes[:, :31].contiguous(), q4.scales, q4.zeros, torch.float32),
        ),
        ("round_bf16_stochastic", "x", lambda: F.round_bf16_stochastic(x.bfloat16(), 0, 0)),
        ("newton_schulz", "x", lambda: F.newton_schulz(x.double(), [3.0, -3.0, 1.0], 1e-7)),
        ("newton_schulz", "x", lambda: F.newton_schulz(x[0], [3.0, -3.0, 1.0], 1e-7)),
        ("newton_schulz", "coefficients", lambda: F.newton_schulz(x, [3.0, -3.0], 1e-7)),
        ("newton_schulz", "eps", lambda: F.newton_schulz(x, [3.0, -3.0, 1.0], 0.0)),
        ("lowrank_project", "side", lambda: F.lowrank_project(g, p_left, "up")),
        ("lowrank_project", "p", lambda: F.lowrank_project(g, p_left, "right")),  # wrong P shape for the side
        ("lowrank_project", "p", lambda: F.lowrank_project(g, p_left.bfloat16(), "left")),
        ("lowrank_project", "g", lambda: F.lowrank_project(g[None], p_left, "left")),
        (
            "lowrank_project_back",
            "p",
            lambda: F.lowrank_project_back(torch.randn(8, 40), p_left.t().contiguous(), "left", 1.0),
        ),
        (
            "lowrank_project_quantized",
            "bits",
            lambda: F.lowrank_project_quantized(g, q8.codes, q8.scales, q8.zeros, 3, "left"),
        ),
        (
            "lowrank_project_quantized",
            "p",
            lambda: F.lowrank_project_quantized(g, q8.codes, q8.scales, q8.zeros, 8, "left"),
        ),
        (
            "lowrank_project_back_quantized",
            "side",
            lambda: F.lowrank_project_back_quantized(torch.randn(4, 40), q8.codes, q8.scales, q8.zeros, 8, "both", 1.0),
        ),
    ]


@pytest.mark.parametrize(("op", "arg", "call"), _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_op_and_argument(op, arg, call):
    with pytest.raises(RuntimeError) as info:
        call()
    msg = str(info.value)
    assert f"fastgrad.{op}" in msg and f"'{arg}'" in msg, msg


def test_device_mismatch_is_reported():
    meta_p = torch.randn(48, 8, device="meta")
    with pytest.raises(RuntimeError, match=r"fastgrad.lowrank_project: argument 'p' must be on g's device"):
        torch.ops.fastgrad.lowrank_project(torch.randn(48, 40), meta_p, "left")


def test_env_report_lists_every_op_and_its_backend():
    from fastgrad.env import report

    text = report()
    assert f"fastgrad        {fastgrad.__version__}" in text
    for op, served in _backends.SERVED_BY.items():
        assert op in text and served["cpu"] in text
