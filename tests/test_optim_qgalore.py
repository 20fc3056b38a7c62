"""QLinear (INT8 weight, custom autograd), quantize_model and QGaLoreAdamW (INT4 projector, adaptive
refresh interval, stochastic-rounding re-quantization): layer numerics, memory, the fast path,
QG-4/QG-8 behaviour, bad groups, convergence on a tiny LLaMA and QGaLoreAdamW8bit. Exact resume and
the NaN/Inf policy are tested for every optimizer in test_optim_common."""

import pytest
import torch
from optim_common import CONFIG, OpCounter, make_qgalore8, quantized_model, train
from optim_common import make_qgalore as make_opt
from optim_common import tiny_model as float_model

from fastgrad.models import LlamaForCausalLM
from fastgrad.models.llama import RMSNorm
from fastgrad.nn import QLinear
from fastgrad.optim import (
    GaLoreAdamW,
    QGaLoreAdamW,
    galore_param_groups,
    layerwise,
)
from fastgrad.optim.projectors import proj_group_size

pytestmark = pytest.mark.usefixtures("single_thread")

N_Q = 14  # 2 layers × (q, k, v, o, gate, up, down)


def tiny_model(seed: int = 0, quantized: bool = True) -> LlamaForCausalLM:
    return quantized_model(seed) if quantized else float_model(seed)


def token_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG["vocab_size"], (4, 17), generator=gen) for _ in range(n)]


def pattern_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    """A learnable repeated-token pattern: cyclic runs through 16 tokens (7·j mod 256), random phase."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 16, (8, 1), generator=gen)
        out.append(((start + torch.arange(33)) % 16) * 7)
    return out


def qlinears(model):
    return [m for m in model.modules() if isinstance(m, QLinear)]


def layer_tensors(layer: QLinear):
    return layer.weight.detach().clone(), layer.scales.clone(), layer.zeros.clone()


# ------------------------------------------------------------------------------------------------
# QLinear
# ------------------------------------------------------------------------------------------------


def test_qlinear_matches_float_linear_on_the_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=True)
    q = QLinear.from_linear(lin, group_size=32)
    ref = torch.nn.Linear(96, 48, bias=True)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized_weight())
        ref.bias.copy_(lin.bias)
    x = torch.randn(3, 7, 96)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 7, 48)
    yq, yr = q(xq), ref(xr)
    yq.backward(dy)
    yr.backward(dy)
    # Same fp32 Ŵ and the same F.linear: the forward is bitwise equal. Backward: the same fp32
    # products (dy·Ŵ, dyᵀx over 21 rows), possibly summed in another order by the BLAS: a few ulp
    # of the magnitudes involved, so 1e-5 relative is ample and far below the INT8 error (≈ 4e-3).
    assert torch.equal(yq, yr)
    torch.testing.assert_close(xq.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert q.weight.grad.dtype == torch.float32 and q.weight.grad.shape == (48, 96)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)
    # the INT8 RTN error itself: at most half a step of the group's range
    err = (q.dequantized_weight() - lin.weight).abs().view(48, 3, 32)
    assert (err <= q.scales.unsqueeze(-1) / 2 + 1e-7).all()
    # bf16 activations: de-quantized to bf16 on the fly; G still accumulates in fp32
    q.weight.grad = None
    q.bias = None
    yb = q(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    yb.float().sum().backward()
    assert q.weight.grad.dtype == torch.float32


def test_gradient_accumulates_over_micro_batches():
    torch.manual_seed(1)
    q = QLinear(64, 32, group_size=32)
    x = torch.randn(4, 5, 64)
    q(x).square().sum().backward()
    full = q.weight.grad.clone()
    q.zero_grad(set_to_none=True)
    assert q.weight.grad is None
    for part in x.split(2):
        q(part).square().sum().backward()
    torch.testing.assert_close(q.weight.grad, full, rtol=1e-5, atol=1e-5)  # fp32, another summation order
    # input that does not require grad (frozen trunk): G is still produced
    q.weight.grad = None
    with torch.no_grad():
        frozen = x.clone()
    q(frozen).sum().backward()
    assert q.weight.grad is not None and frozen.grad is None


def test_quantize_model_swaps_exactly_the_targets_and_runs():
    model = tiny_model()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(qlinears(model)) == N_Q
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert all(isinstance(m, RMSNorm) for n, m in model.named_modules() if n.endswith("norm"))
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head for m in model.modules())
    ids = token_batches(1)[0]
    loss = model(ids, ids)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.dtype == torch.float32 for m in qlinears(model))
    # the quantized model is close to the float one it came from (INT8 RTN, groups of 32)
    torch.testing.assert_close(loss, tiny_model(quantized=False)(ids, ids), rtol=1e-2, atol=0)
    model.to(torch.bfloat16)  # scales/zeros stay fp32, the rest becomes bf16
    assert all(m.scales.dtype == torch.float32 and m.weight.dtype == torch.uint8 for m in qlinears(model))
    assert model(ids).dtype == torch.bfloat16


def test_qlinear_memory_is_one_byte_per_value_plus_groups():
    q = QLinear(256, 96, group_size=64)
    tensors = list(q.parameters()) + list(q.buffers())
    m, n = 96, 256
    assert sum(t.numel() * t.element_size() for t in tensors) == m * n + 2 * 4 * m * n // 64
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (m, n)
    assert not any(t.is_floating_point() and t.numel() >= m * n for t in tensors)  # no float copy


# ------------------------------------------------------------------------------------------------
# QGaLoreAdamW: INT4 projector on the fast path
# ------------------------------------------------------------------------------------------------


def test_projector_is_packed_int4_and_used_through_the_quantized_ops():
    model = tiny_model()
    opt = make_opt(model, rank=16, gap=2)
    for k, ids in enumerate(token_batches(3)):  # steps 0 (refresh), 1, 2 (refresh)
        opt.zero_grad()
        with OpCounter() as backward_counter:
            model(ids, ids).backward()
        with OpCounter() as counter:
            opt.step()
        # Between refreshes the QLinear computes R = down(G) itself in backward (fastgrad.nn.lowrank);
        # on refresh steps it forms G and the optimizer projects it.
        assert backward_counter.calls["fastgrad.lowrank_grad_quantized"] == (N_Q if k == 1 else 0)
        assert counter.calls["fastgrad.lowrank_project_quantized"] == (N_Q if k != 1 else 0)
        # moments, N, back-projection with the INT4 P, decay and the SR re-quantization of the INT8
        # weight: one fused op per weight
        assert counter.calls["fastgrad.galore_adam_step_int8_"] == N_Q
        assert counter.calls["fastgrad.lowrank_project_back_quantized_add_"] == 0
        assert counter.calls["fastgrad.quantize_int8"] == 0
        assert counter.calls["fastgrad.quantize_int4"] == (N_Q if k != 1 else 0)
        for dense in ("fastgrad.lowrank_project", "fastgrad.galore_adam_step_", "fastgrad.dequantize_int4"):
            assert counter.calls[dense] == 0, dense  # P is never densified
    for layer in qlinears(model):
        st = opt.state[layer.weight]
        m, n = layer.weight.shape
        r, d = 16, min(m, n)
        g = proj_group_size(st["proj_codes"].shape[1] * 2, 256)
        assert st["proj_codes"].dtype == torch.uint8 and st["proj_codes"].numel() == r * d // 2
        assert st["proj_scales"].numel() == r * d // g and st["proj_scales"].dtype == torch.float32
        assert "proj" not in st
        assert st["exp_avg"].shape == ((m, r) if m >= n else (r, n))
    # state_bytes: moments 2·D·r'·4 + INT4 P r'·d/2 + 8·r'·d/g + past vector + queue; AdamW 2·numel·4
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if "rank" not in group:
                expected += 2 * p.numel() * 4
                continue
            m, n = p.shape
            d, big, r = min(m, n), max(m, n), st["proj_rank"]
            rows, row = (r, n) if m >= n else (m, r)
            g = proj_group_size(row, group["proj_group_size"])
            expected += 2 * big * r * 4 + r * d // 2 + 8 * r * d // g + 4 * (n if m >= n else m)
            expected += 4 * group["queue_size"]  # a pending growth of T is a host bool: no tensor bytes
    assert opt.state_bytes() == expected


# ------------------------------------------------------------------------------------------------
# stochastic rounding of the weight update
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [True, False])
def test_sub_step_updates_survive_only_with_stochastic_rounding(stochastic):
    """Each row's min and max get no gradient (they pin the grid); the 30 interior values get a
    constant gradient, so AdamW moves them by lr = 0.1 quantization steps per step. RTN rounds every
    such move back; SR is unbiased, so the mean moves by steps·lr (a martingale with per-step
    variance ≤ s²/4: over 60 steps and 120 values the mean's s.d. is ≈ 0.2 s)."""
    m, n, steps = 4, 32, 60
    w = torch.linspace(-1.0, 1.0, n).repeat(m, 1)
    layer = QLinear(n, m, group_size=n, weight=w)
    step_size = float(layer.scales.mean())  # 2/255
    lr = 0.1 * step_size
    grad = torch.ones(m, n)
    grad[:, 0] = grad[:, -1] = 0.0
    opt = QGaLoreAdamW([{"params": [layer.weight], "stochastic_round": stochastic}], lr=lr)
    before = layer.dequantized_weight()
    codes0 = layer.weight.clone()
    for _ in range(steps):
        layer.weight.grad_dtype = torch.float32
        layer.weight.grad = grad.clone()
        opt.step()
    after = layer.dequantized_weight()
    assert opt.state[layer.weight]["sr_offset"] == steps * m * n
    drift = (after - before)[:, 1:-1].mean() / step_size  # in quantization steps
    if stochastic:
        assert abs(drift + steps * 0.1) < 1.5, drift
    else:
        assert torch.equal(layer.weight, codes0)


# ------------------------------------------------------------------------------------------------
# adaptive refresh interval (§3.3)
# ------------------------------------------------------------------------------------------------


def _refresh_steps(opt, p, grad, steps):
    seen = []
    for k in range(steps):
        p.grad = grad.clone()
        opt.step()
        st = opt.state[p]
        if st["proj_step"] == k:
            seen.append(k)
    return seen


def _adaptive_opt(p, faithful):
    group = {"params": [p], "rank": 4, "update_proj_gap": 2, "queue_size": 2, "gamma_proj": 2, "cos_threshold": 0.4}
    return QGaLoreAdamW([group], lr=0.0, faithful=faithful)


def _sign_flipping_svd(monkeypatch):
    """torch.linalg.svd returning (−U, S, −Vᵀ) on every other call: an equally valid SVD (QG-4)."""
    real = torch.linalg.svd
    calls = {"n": 0}

    def svd(a, *args, **kwargs):
        u, s, vh = real(a, *args, **kwargs)
        calls["n"] += 1
        return (-u, s, -vh) if calls["n"] % 2 == 0 else (u, s, vh)

    monkeypatch.setattr(torch.linalg, "svd", svd)


GEOMETRIC = [0, 2, 4, 8, 16, 32]  # T: 2 until the queue (2 cosines) is full at k=4, then 4, 8, 16, 32


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])  # right- and left-projected
def test_interval_grows_geometrically_on_a_constant_gradient(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    grad = torch.randn(shape)
    opt = _adaptive_opt(p, faithful=False)
    assert _refresh_steps(opt, p, grad, 40) == GEOMETRIC
    st = opt.state[p]
    assert st["proj_svd_count"] == len(GEOMETRIC) and st["proj_gap"] == 16 and bool(st["proj_pending"])
    torch.testing.assert_close(st["proj_queue"], torch.ones(2))


@pytest.mark.parametrize("faithful", [False, True])
def test_sign_flip_of_the_svd_qg4(monkeypatch, faithful):
    """With an SVD that flips the sign of its vectors between refreshes, the signed cosine of
    q-galore-torch (faithful) is −1 and T never grows (QG-4); the default |cos| grows T as usual."""
    _sign_flipping_svd(monkeypatch)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(48, 32))
    grad = torch.randn(48, 32)
    opt = _adaptive_opt(p, faithful=faithful)
    seen = _refresh_steps(opt, p, grad, 40)
    st = opt.state[p]
    if faithful:
        assert seen == list(range(0, 40, 2)) and st["proj_gap"] == 2
        torch.testing.assert_close(st["proj_queue"], -torch.ones(2))
    else:
        assert seen == GEOMETRIC


# ------------------------------------------------------------------------------------------------
# float parameters (QG-8), bad groups
# ------------------------------------------------------------------------------------------------


def test_float_parameters_are_updated_qg8():
    model = tiny_model()
    opt = make_opt(model)
    floats = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    codes = [layer_tensors(m) for m in qlinears(model)]
    assert any("embed" in n for n in floats) and any("norm" in n for n in floats) and "lm_head.weight" in floats
    train(model, opt, token_batches(1))
    for n, p in model.named_parameters():
        if p.is_floating_point():
            assert not torch.equal(p, floats[n]), n
    for layer, (c, _, _) in zip(qlinears(model), codes, strict=True):
        assert not torch.equal(layer.weight, c)


def test_bad_groups():
    with pytest.raises(ValueError, match="projector"):
        make_opt(tiny_model(), projector="dct")
    with pytest.raises(ValueError, match="even length"):
        make_opt(tiny_model(), rank=15)  # wide weights: P is 64×15, rows cannot be packed
    with pytest.raises(ValueError, match="group_size"):
        QLinear(48, 8, group_size=32)


# ------------------------------------------------------------------------------------------------
# convergence on a tiny LLaMA
# ------------------------------------------------------------------------------------------------


def test_tiny_llama_learns_and_is_close_to_galore(capsys):
    batches = pattern_batches(40)
    qmodel = tiny_model()
    qlosses = train(qmodel, make_opt(qmodel, rank=16, gap=10, lr=3e-3), batches)
    fmodel = tiny_model(quantized=False)
    fopt = GaLoreAdamW(galore_param_groups(fmodel, rank=16, update_proj_gap=10, scale=0.25), lr=3e-3)
    flosses = train(fmodel, fopt, batches)
    q_end, f_end = sum(qlosses[-5:]) / 5, sum(flosses[-5:]) / 5
    with capsys.disabled():
        print(
            f"\n  tiny LLaMA, 40 steps: Q-GaLore (INT8 W, INT4 P) {qlosses[0]:.3f} -> {q_end:.4f}; "
            f"GaLore (fp32) {flosses[0]:.3f} -> {f_end:.4f}"
        )
    assert q_end < 0.2 * qlosses[0]
    assert q_end < 2.0 * f_end + 0.05


# ------------------------------------------------------------------------------------------------
# QGaLoreAdamW8bit: Q-GaLore with 8-bit moments (the recipe's optimizer)
# ------------------------------------------------------------------------------------------------


def test_qgalore8bit_trains_like_qgalore_with_a_quarter_of_the_moment_bytes():
    """Tiny LLaMA, 30 steps on 6 repeated batches: every moment of ≥ 1024 elements (the projected
    D×16 moments of all 14 QLinear weights, the embedding and the head) in 8 bits."""
    batches = token_batches(6) * 5
    fp32_model = tiny_model()  # already INT8 (QLinear)
    fp32_losses = train(fp32_model, make_opt(fp32_model, rank=16, gap=3), batches)
    model = tiny_model()
    opt = make_qgalore8(model)
    with OpCounter() as counter:
        losses = train(model, opt, batches)
    n_q = len(qlinears(model))
    eight = [p for p, st in opt.state.items() if "exp_avg_codes" in st]
    assert len(eight) == n_q + 2  # the QLinear weights, the embedding and the head
    # per step: 2 encodes per 8-bit tensor; each QLinear weight's update (moments decoded, SR
    # re-quantization) is one fused op
    assert counter.calls["fastgrad.quantize_int8"] == 30 * 2 * len(eight)
    assert counter.calls["fastgrad.galore_adam_step_int8_"] == 30 * n_q
    assert losses[-1] < 0.7 * losses[0]
    assert abs(losses[-1] / fp32_losses[-1] - 1) < 0.05, (losses[-1], fp32_losses[-1])
    for p in eight:  # 2·n_pad + 12·blocks bytes instead of 2·n·4
        st = opt.state[p]
        n_pad = st["exp_avg_codes"].numel()
        codes_and_scales = sum(
            v.numel() * v.element_size() for k, v in st.items() if k.startswith("exp_avg") and torch.is_tensor(v)
        )
        assert codes_and_scales == 2 * n_pad + 12 * (n_pad // 256)


def test_qgalore8bit_layerwise_is_the_same():
    batches = token_batches(7)
    model = tiny_model()
    train(model, make_qgalore8(model), batches)
    lw_model = tiny_model()
    lw = layerwise(lw_model, make_qgalore8)
    for ids in batches:
        lw_model(ids, ids).backward()
        lw.finish_step()
    for (name, a), b in zip(model.state_dict().items(), lw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
