"""fastgrad.optim.GaLoreMuon and QGaLoreMuon: Muon's momentum and Newton–Schulz iteration in each
weight's GaLore subspace (QGaLoreMuon: INT8 weights, INT4 projector), against the math written out
with torch ops; the low-rank-gradient layers; the state; and that they learn on the tiny LLaMA."""

import pytest
import torch
from optim_common import N_LOWRANK, make_qgalore, make_qgalore_muon, tiny_model, token_batches, train

from fastgrad import optim
from fastgrad.nn import QLinear, lowrank_grad_model, projected_grad, quantize_model
from fastgrad.ops import dequantize_int4, dequantize_int8, newton_schulz, quantize_int4, quantize_int8
from fastgrad.optim.muon import adjusted_lr
from fastgrad.optim.projectors import proj_group_size

pytestmark = pytest.mark.usefixtures("single_thread")

LR, WD, MU, RANK, GAP = 2e-2, 0.1, 0.9, 4, 2


def _reference(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], scale: float) -> list[torch.Tensor]:
    """The update of the module docstring in torch ops: the SVD subspace of the gradient at steps
    0, GAP, 2·GAP, ...; the momentum carried into the new basis; nesterov; fp32 Newton–Schulz."""
    out = []
    for w, gs in zip(weights, grads, strict=True):
        w = w.clone()
        m, n = w.shape
        left = m < n  # the "std" side rule
        buf = proj = None
        for k, g in enumerate(gs):
            if k % GAP == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                new = u[:, :RANK] if left else vh[:RANK]
                if buf is not None:
                    buf = (new.T @ proj) @ buf if left else buf @ (proj @ new.T)
                proj = new
            low = proj.T @ g if left else g @ proj.T
            buf = torch.zeros_like(low) if buf is None else buf
            buf = MU * buf + (1 - MU) * low
            update = (1 - MU) * low + MU * buf
            ortho = newton_schulz(update, eps=1e-7)
            w.mul_(1 - LR * WD)
            step = adjusted_lr(LR, None, w.shape) * scale
            w -= step * (proj @ ortho if left else ortho @ proj)
        out.append(w)
    return out


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_galore_muon_is_the_math_of_its_docstring(scale):
    """Tall (right side) and wide (left side) weights, 5 steps with refreshes at steps 0, 2 and 4,
    given gradients: the weights of the written-out update within fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((12, 8), (6, 10))]
    grads = [[torch.randn(w.shape, generator=gen) for _ in range(5)] for w in weights]
    expected = _reference([w.detach() for w in weights], grads, scale)
    group = {"params": weights, "rank": RANK, "update_proj_gap": GAP, "scale": scale}
    opt = optim.GaLoreMuon([group], lr=LR, weight_decay=WD, momentum=MU, ns_dtype=torch.float32)
    for k in range(5):
        for w, gs in zip(weights, grads, strict=True):
            w.grad = gs[k]
        opt.step()
    for w, ref in zip(weights, expected, strict=True):
        torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)
    state = opt.state[weights[0]]
    assert state["momentum_buffer"].shape == (12, RANK) and state["proj"].shape == (RANK, 8)
    assert opt.state[weights[1]]["momentum_buffer"].shape == (RANK, 10)


def test_without_state_transfer_the_momentum_stays_in_the_old_coordinates():
    """state_transfer=False keeps B as it is at a refresh (GaLore's default behaviour for Adam): the
    weights then differ from the transferred run's after the first refresh, not before."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 8, generator=gen)
    grads = [torch.randn(12, 8, generator=gen) for _ in range(4)]
    runs = []
    for transfer in (True, False):
        w = torch.nn.Parameter(w0.clone())
        group = {"params": [w], "rank": RANK, "update_proj_gap": GAP, "state_transfer": transfer}
        opt = optim.GaLoreMuon([group], lr=LR, ns_dtype=torch.float32)
        seen = []
        for g in grads:
            w.grad = g
            opt.step()
            seen.append(w.detach().clone())
        runs.append(seen)
    assert torch.equal(runs[0][1], runs[1][1])  # steps 0-1: one subspace
    assert not torch.allclose(runs[0][3], runs[1][3])


def test_low_rank_gradient_layers_feed_it_r_without_g():
    """With LowRankGradLinear layers the 14 weights get R from backward between refreshes (no
    weight.grad), and the training is the one of G projected by the optimizer (fp32 rounding)."""
    batches = token_batches(1, rows=4, seed=3) * 6

    def run(convert: bool) -> tuple[list[float], int]:
        model = tiny_model()
        if convert:
            lowrank_grad_model(model)
        opt = optim.GaLoreMuon(optim.galore_muon_param_groups(model, rank=8, update_proj_gap=3), lr=LR)
        losses, projected = [], 0
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            loss = model(ids, ids)
            loss.backward()
            projected += sum(p.grad is None and projected_grad(p) is not None for p in model.parameters())
            opt.step()
            losses.append(loss.item())
        return losses, projected

    (plain, none), (layers, projected) = run(False), run(True)
    assert none == 0 and projected == N_LOWRANK * 4  # steps 2, 3, 5, 6 of 6 (refreshes at 1 and 4)
    assert layers == pytest.approx(plain, rel=1e-4)


def test_state_bytes_are_the_formula():
    """Per low-rank weight m×n (r' = min(r, m, n)): the momentum r'·max(m, n) and the SVD projector
    r'·min(m, n), fp32; per AdamW parameter two moments."""
    model = tiny_model()
    opt = optim.GaLoreMuon(optim.galore_muon_param_groups(model, rank=8), lr=LR)
    train(model, opt, token_batches(2))
    lowrank = {id(p) for p in opt.param_groups[0]["params"]}
    expected = sum(
        4 * 8 * (max(p.shape) + min(p.shape)) if id(p) in lowrank else 2 * 4 * p.numel() for p in model.parameters()
    )
    assert opt.state_bytes() == expected
    muon = optim.Muon(optim.muon_param_groups(tiny_model()), lr=LR)
    muon_model = muon.param_groups[0]["params"]
    assert sum(4 * p.numel() for p in muon_model) > 2 * sum(4 * 8 * max(p.shape) for p in muon_model)


def test_galore_muon_learns_like_galore_on_the_tiny_llama():
    """30 steps on one batch at rank 16 (a refresh every 10): GaLoreMuon (lr 2e-2, AdamW 3e-3 on the
    rest) against GaLoreAdamW (lr 3e-3). Measured final losses: GaLoreMuon 0.596, GaLoreAdamW 0.599;
    the criterion, at most 1.1x GaLore's, fails for the negative control (GaLoreMuon's low-rank
    weights at lr 0, the rest trained by AdamW)."""
    batches = token_batches(1) * 30

    def final_loss(make) -> float:
        model = tiny_model()
        return train(model, make(model), batches)[-1]

    def galore_muon(lr: float):
        return lambda m: optim.GaLoreMuon(
            optim.galore_muon_param_groups(m, rank=16, update_proj_gap=10, adamw_options={"lr": 3e-3}), lr=lr
        )

    galore = final_loss(lambda m: optim.GaLoreAdamW(optim.galore_param_groups(m, rank=16, update_proj_gap=10), lr=3e-3))
    ours, frozen = final_loss(galore_muon(LR)), final_loss(galore_muon(0.0))
    print(f"final loss: GaLoreMuon {ours:.4f}, GaLoreAdamW {galore:.4f}, GaLoreMuon at lr 0 {frozen:.4f}")
    assert ours <= 1.1 * galore
    assert not frozen <= 1.1 * galore


def test_bad_groups_are_refused():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="a group with 'rank' is a Muon group"):
        optim.GaLoreMuon([{"params": [w], "rank": 2, "use_muon": False}])
    with pytest.raises(ValueError, match="'rank' must be a positive int"):
        optim.GaLoreMuon([{"params": [w], "rank": 0}])
    with pytest.raises(ValueError, match="Muon: param groups take no 'rank'"):
        optim.Muon([{"params": [w], "rank": 2}])


# ------------------------------------------------------------------------------------------------
# QGaLoreMuon: INT8 weights, INT4 projector
# ------------------------------------------------------------------------------------------------


def _qgalore_muon_reference(layer: QLinear, grads: list[torch.Tensor]) -> torch.Tensor:
    """The INT8 weight's codes after QGaLoreMuon's steps (round to nearest), in torch ops: the INT4
    projector P̂ of the SVD basis at steps 0, GAP, ...; R, momentum and Newton–Schulz as GaLoreMuon's
    (no transfer); Ŵ decayed, updated by up(O, P̂) and re-quantized."""
    codes, scales, zeros = (t.detach().clone() for t in (layer.weight, layer.scales, layer.zeros))
    m, n = codes.shape
    left = m < n
    buf = p_hat = None
    for k, g in enumerate(grads):
        if k % GAP == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = (u[:, :RANK] if left else vh[:RANK]).contiguous()
            q = quantize_int4(basis, proj_group_size(basis.shape[1], 256))
            p_hat = dequantize_int4(q.codes, q.scales, q.zeros)
        low = p_hat.T @ g if left else g @ p_hat.T
        buf = (1 - MU) * low if buf is None else MU * buf + (1 - MU) * low
        ortho = newton_schulz((1 - MU) * low + MU * buf, eps=1e-7)
        w = dequantize_int8(codes, scales, zeros) * (1 - LR * WD)
        w -= adjusted_lr(LR, None, (m, n)) * (p_hat @ ortho if left else ortho @ p_hat)
        codes, scales, zeros, _ = quantize_int8(w, layer.group_size)
    return dequantize_int8(codes, scales, zeros)


def test_qgalore_muon_is_the_math_of_its_docstring():
    """Tall and wide QLinear weights, 5 steps of given gradients with round-to-nearest re-quantization:
    the decoded weights of the written-out update, but for codes a rounding boundary apart (the
    fused INT4 matmuls sum in another order; measured: none here)."""
    torch.manual_seed(0)
    layers = [QLinear(8, 12, group_size=8), QLinear(10, 6, group_size=5)]
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(q.weight.shape, generator=gen) for _ in range(5)] for q in layers]
    expected = [_qgalore_muon_reference(q, gs) for q, gs in zip(layers, grads, strict=True)]
    group = {"params": [q.weight for q in layers], "rank": RANK, "update_proj_gap": GAP, "stochastic_round": False}
    opt = optim.QGaLoreMuon([group], lr=LR, weight_decay=WD, momentum=MU, ns_dtype=torch.float32)
    for k in range(5):
        for q, gs in zip(layers, grads, strict=True):
            q.weight.grad_dtype = torch.float32
            q.weight.grad = gs[k]
        opt.step()
    for q, ref in zip(layers, expected, strict=True):
        ours = q.dequantized_weight()
        step = q.scales.repeat_interleave(q.group_size, dim=1)
        assert ((ours - ref).abs() <= 1.01 * step).all()  # at most one code apart
        assert (ours - ref).abs().le(1e-5).double().mean() >= 0.99
    assert opt.state[layers[0].weight]["proj_codes"].dtype == torch.uint8  # the INT4 projector


def test_qgalore_muon_learns_like_qgalore_on_the_tiny_llama():
    """30 steps on one batch, rank 16, a refresh every 10, INT8 weights (stochastic rounding): the
    final loss within 1.1x Q-GaLore's (measured: QGaLoreMuon 0.603, QGaLoreAdamW 0.596); the INT8
    weights frozen at lr 0 (AdamW still training the rest: 0.711) fail the criterion."""
    batches = token_batches(1) * 30

    def final_loss(make) -> float:
        model = quantize_model(tiny_model(), group_size=32)
        return train(model, make(model), batches)[-1]

    qgalore = final_loss(lambda m: make_qgalore(m, rank=16, gap=10))
    ours = final_loss(lambda m: make_qgalore_muon(m, rank=16, gap=10))
    frozen = final_loss(lambda m: make_qgalore_muon(m, rank=16, gap=10, lr=0.0))
    print(f"final loss: QGaLoreMuon {ours:.4f}, QGaLoreAdamW {qgalore:.4f}, QGaLoreMuon at lr 0 {frozen:.4f}")
    assert ours <= 1.1 * qgalore
    assert not frozen <= 1.1 * qgalore


def test_qgalore_muon_refuses_state_transfer():
    layer = QLinear(8, 12, group_size=8)
    with pytest.raises(ValueError, match="QGaLoreMuon: state_transfer is not supported"):
        optim.QGaLoreMuon([{"params": [layer.weight], "rank": 4, "state_transfer": True}])


def test_qgalore_muon_state_bytes_are_the_formula():
    """Per INT8 weight m×n (d = min, D = max, r' = min(r, d), g the projector's group along P's rows,
    Q the queue): the momentum D·r'·4 + the INT4 P r'·d/2 + 8·r'·d/g + the past vector + 4·Q, half
    of QGaLoreAdamW's moments; per AdamW parameter two moments."""
    model = quantize_model(tiny_model(), group_size=32)
    opt = make_qgalore_muon(model, rank=16, gap=3)
    train(model, opt, token_batches(2))
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if "rank" not in group:
                expected += 2 * p.numel() * 4
                continue
            m, n = p.shape
            d, big, r = min(m, n), max(m, n), opt.state[p]["proj_rank"]
            g = proj_group_size(r if m < n else n, group["proj_group_size"])
            expected += big * r * 4 + r * d // 2 + 8 * r * d // g + 4 * (n if m >= n else m) + 4 * group["queue_size"]
    assert opt.state_bytes() == expected
