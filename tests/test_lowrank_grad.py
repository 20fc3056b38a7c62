"""Low-rank weight gradients (fastgrad.nn.lowrank): LowRankGradLinear and QLinear hand the optimizer
R = down(G, P) computed from dy and x, and training is the same as with full gradients projected by
the optimizer — plain, with gradient accumulation, layer-wise — with no m×n tensor in a non-refresh
step (profiler memory trace). Resume (a loaded optimizer publishes its projections again) is a case
of test_optim_common's resume test."""

import pytest
import torch
from optim_common import N_LOWRANK, OpCounter, tiny_model, token_batches, train

import fastgrad.optim.base as optim_base
from fastgrad.nn import (
    LowRankGradLinear,
    QLinear,
    clip_grad_norm_,
    lowrank_grad_model,
    projected_grad,
    quantize_model,
)
from fastgrad.optim import FiraAdamW, GaLoreAdamW, QGaLoreAdamW, galore_param_groups, layerwise, qgalore_param_groups
from fastgrad.train.profiling import measured_memory_events

GAP = 5  # refreshes at steps 0, 5, 10


def galore(model):
    return GaLoreAdamW(galore_param_groups(model, rank=8, update_proj_gap=GAP), lr=1e-2)


def qgalore(model):
    return QGaLoreAdamW(qgalore_param_groups(model, rank=8, update_proj_gap=GAP, proj_group_size=8), lr=1e-2)


def converted(seed=0):
    return lowrank_grad_model(tiny_model(seed))


def quantized(seed=0):
    return quantize_model(tiny_model(seed), 32)


@pytest.fixture
def full_gradients_only(monkeypatch):
    """The optimizer publishes no projection: every layer forms G (the reference path)."""
    monkeypatch.setattr(optim_base, "accepts_projected_grad", lambda p: False)


def _train_layerwise(model, factory, batches, accum=1):
    lw = layerwise(model, factory, grad_accum_steps=accum)
    losses = []
    for ids in batches:
        for part in ids.chunk(accum):
            loss = model(part, part) / accum
            loss.backward()
        lw.finish_step()
        losses.append(loss.item())
    return losses, lw


def test_conversion_shares_parameters_and_behaves_as_linear():
    plain, model = tiny_model(), converted()
    targets = [m for m in model.modules() if isinstance(m, LowRankGradLinear)]
    assert len(targets) == N_LOWRANK and type(model.lm_head) is torch.nn.Linear  # the head is not a target
    assert plain.state_dict().keys() == model.state_dict().keys()
    ids = token_batches(1)[0]
    loss_plain, loss = plain(ids, ids), model(ids, ids)
    assert torch.equal(loss_plain, loss)
    loss_plain.backward()
    loss.backward()  # no optimizer has published a projection: ordinary gradients
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)
        assert projected_grad(q) is None


def test_galore_with_projected_gradients_matches_full_gradients():
    batches = token_batches(12)
    base_model = tiny_model()
    base_losses = train(base_model, galore(base_model), batches)
    model = converted()
    opt = galore(model)
    losses, counts, grads_none = [], [], []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        with OpCounter() as counter:
            loss = model(ids, ids)
            loss.backward()
            grads_none.append(all(m.weight.grad is None for m in model.modules() if isinstance(m, LowRankGradLinear)))
            opt.step()
        losses.append(loss.item())
        counts.append((counter.calls["fastgrad.lowrank_grad"], counter.calls["fastgrad.lowrank_project"]))
    refresh = [k % GAP == 0 for k in range(len(batches))]
    # Between refreshes every target weight's R comes from lowrank_grad and G is never formed.
    assert counts == [(0, N_LOWRANK) if r else (N_LOWRANK, 0) for r in refresh]
    assert grads_none == [not r for r in refresh]
    # The same training: both sides compute down(dyᵀx, P) in fp32, in a different order (~1e-7).
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=1e-5, atol=0)
    for p, q in zip(base_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_adds_projected_gradients():
    batches = token_batches(6, rows=4)

    def run(model):
        opt = galore(model)
        for ids in batches:
            opt.zero_grad()
            for part in ids.chunk(2):
                (model(part, part) / 2).backward()
            opt.step()
        return model

    base, model = run(tiny_model()), run(converted())
    for p, q in zip(base.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("accum", [1, 2])
def test_layerwise_with_projected_gradients(accum):
    batches = token_batches(8)
    base = converted()
    train(base, galore(base), batches) if accum == 1 else None
    model = converted()
    with OpCounter() as counter:
        _, lw = _train_layerwise(model, galore, batches, accum)
    assert counter.calls["fastgrad.lowrank_grad"] == accum * N_LOWRANK * sum(k % GAP != 0 for k in range(8))
    if accum == 1:  # the same arithmetic as the non-layer-wise step: bitwise on CPU
        for p, q in zip(base.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)
    else:  # against layer-wise accumulation of full gradients projected by the driver
        ref_model = tiny_model()
        _train_layerwise(ref_model, galore, batches, accum)
        for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_qgalore_int8_layers_deliver_projected_gradients(full_gradients_only, monkeypatch):
    batches = token_batches(12)
    base_model = quantized()
    base_losses = train(base_model, qgalore(base_model), batches)
    monkeypatch.undo()
    model = quantized()
    with OpCounter() as counter:
        losses = train(model, qgalore(model), batches)
    n_q = sum(isinstance(m, QLinear) for m in model.modules())
    assert counter.calls["fastgrad.lowrank_grad_quantized"] == n_q * sum(k % GAP != 0 for k in range(12))
    # Same steps; codes are re-quantized with SR after each, so an fp32-rounding difference in R can
    # flip a code: compare losses (tight) rather than codes.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=2e-5, atol=0)


def test_qlinear_projected_gradient_takes_bf16_activations_as_they_are(monkeypatch):
    """bf16 training: QLinear's projected weight gradient multiplies dy and x in bf16 (fp32
    accumulation inside the op), with no fp32 copies of the T×m and T×n activations, and hands the
    optimizer an fp32 R (its Adam moments are fp32)."""
    import fastgrad.nn.lowrank as lowrank_mod

    seen = []
    real = lowrank_mod.lowrank_grad

    def spy(dy, x, proj, side):
        seen.append((dy.dtype, x.dtype))
        return real(dy, x, proj, side)

    monkeypatch.setattr(lowrank_mod, "lowrank_grad", spy)
    model = quantized().to(torch.bfloat16)
    opt = qgalore(model)
    train(model, opt, token_batches(2))  # step 0 refreshes (G); step 1 takes projected gradients
    n_q = sum(isinstance(m, QLinear) for m in model.modules())
    assert seen == [(torch.bfloat16, torch.bfloat16)] * n_q
    weight = next(m.weight for m in model.modules() if isinstance(m, QLinear))
    model(token_batches(1)[0], token_batches(1)[0]).backward()
    assert projected_grad(weight).dtype == torch.float32


def test_qgalore_layerwise_equals_qgalore():
    batches = token_batches(8)
    plain = quantized()
    plain_losses = train(plain, qgalore(plain), batches)
    model = quantized()
    losses, _ = _train_layerwise(model, qgalore, batches)
    assert losses == plain_losses
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_torch_compile_keeps_projected_gradients():
    """torch.compile of a converted model: between refreshes the layers still deliver R (the
    custom autograd function reads the published projection at backward time, not at trace time)."""
    model = converted()
    opt = galore(model)
    compiled = torch.compile(model)
    layer = next(m for m in model.modules() if isinstance(m, LowRankGradLinear))
    delivered = []
    for ids in token_batches(3):
        opt.zero_grad()
        compiled(ids, ids).backward()
        delivered.append((layer.weight.grad is None, projected_grad(layer.weight) is not None))
        opt.step()
    assert delivered == [(False, False), (True, True), (True, True)]  # step 0 refreshes (GAP = 5)


@pytest.mark.parametrize("make", [converted, quantized], ids=["lowrank-linear", "qlinear"])
def test_activation_checkpointing_keeps_projected_gradients(make):
    """Non-reentrant activation checkpointing hands the saved weight back from the recomputation
    as another tensor object: the layers find their projection through the module, so between
    refreshes they still deliver R (and no G), and training equals the unchecked model's."""
    batches = token_batches(3)
    factory = galore if make is converted else qgalore
    plain = make()
    base = train(plain, factory(plain), batches)
    model = make()
    model.gradient_checkpointing = True
    opt = factory(model)
    weight = next(m.weight for m in model.modules() if isinstance(m, (LowRankGradLinear, QLinear)))
    delivered, losses = [], []
    for ids in batches:
        opt.zero_grad()
        with OpCounter() as counter:
            loss = model(ids, ids)
            loss.backward()
        delivered.append((projected_grad(weight) is not None, counter.calls["fastgrad.lowrank_grad"]
                          + counter.calls["fastgrad.lowrank_grad_quantized"]))  # fmt: skip
        losses.append(loss.item())
        opt.step()
    assert delivered == [(False, 0), (True, N_LOWRANK), (True, N_LOWRANK)]  # step 0 refreshes (GAP = 5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base), rtol=1e-5, atol=0)


def test_qgalore_layerwise_follows_the_adaptive_interval():
    """cos_threshold 0 and a queue of 1: T doubles at every refresh (2, 4, 8): the layer-wise
    driver must refresh on the optimizer's schedule, not on k % update_proj_gap."""

    def factory(model):
        groups = qgalore_param_groups(
            model, rank=8, update_proj_gap=2, proj_group_size=8, cos_threshold=0.0, queue_size=1
        )
        return QGaLoreAdamW(groups, lr=1e-2)

    batches = token_batches(12)
    plain = quantized()
    opt = factory(plain)
    plain_losses = train(plain, opt, batches)
    assert max(st.get("proj_gap", 0) for st in opt.state.values()) >= 8  # T did grow
    model = quantized()
    losses, _ = _train_layerwise(model, factory, batches)
    assert losses == plain_losses


def test_clip_grad_norm_covers_projected_gradients_and_zero_grad_clears_them():
    batches = token_batches(2)
    model = converted()
    opt = galore(model)
    train(model, opt, batches[:1])  # step 0 refreshes; P is published for step 1
    opt.zero_grad()
    loss = model(batches[1], batches[1])
    loss.backward()
    weights = [m.weight for m in model.modules() if isinstance(m, LowRankGradLinear)]
    lows = [projected_grad(w) for w in weights]
    others = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(t is not None for t in lows) and len(others) == sum(1 for _ in model.parameters()) - N_LOWRANK
    expected = torch.sqrt(sum(t.double().square().sum() for t in lows + others))
    before = [t.clone() for t in lows]
    norm = clip_grad_norm_(model.parameters(), float(expected) / 2)
    torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(lows[0], before[0] * float(expected) / 2 / (float(expected) + 1e-6))
    opt.zero_grad()
    assert all(projected_grad(w) is None for w in weights)


def test_a_new_optimizer_withdraws_the_projections_of_the_previous_one():
    model = converted()
    train(model, galore(model), token_batches(2))  # publishes P for step 2
    opt = galore(model)  # a fresh optimizer: its first step refreshes, the layers must form G
    train(model, opt, token_batches(1, seed=7))
    assert all(opt.state[m.weight]["step"] == 1 for m in model.modules() if isinstance(m, LowRankGradLinear))
    fira = FiraAdamW(galore_param_groups(model, rank=8, update_proj_gap=GAP), lr=1e-2)  # reads G: withdraws all
    train(model, fira, token_batches(1, seed=8))
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, LowRankGradLinear))


def test_projected_gradient_at_a_refresh_step_is_an_error():
    model = converted()
    opt = galore(model)
    batches = token_batches(GAP + 1)
    train(model, opt, batches[: GAP - 1])  # the next step (k = GAP - 1) does not refresh
    opt.zero_grad()
    model(batches[0], batches[0]).backward()  # R delivered for step GAP - 1 ...
    opt.step()
    model(batches[1], batches[1]).backward()  # ... but now k = GAP refreshes: the layer formed G
    assert all(projected_grad(m.weight) is None for m in model.modules() if isinstance(m, LowRankGradLinear))
    layer = next(m for m in model.modules() if isinstance(m, LowRankGradLinear))
    from fastgrad.nn.lowrank import deliver_projected_grad

    deliver_projected_grad(layer.weight, torch.zeros(8, layer.weight.shape[1]))
    with pytest.raises(RuntimeError, match="refreshed at this step"):
        opt.step()


# ------------------------------------------------------------------------------------------------
# memory trace: no m×n tensor in a non-refresh step
# ------------------------------------------------------------------------------------------------

DIM, LAYERS = 1024, 3


def _allocations(fn) -> list[int]:
    """Sizes of every CPU allocation made while ``fn`` runs (torch.profiler memory events)."""
    return [nbytes for nbytes in measured_memory_events(fn) if nbytes > 0]


def _stack(layer_cls):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(DIM, DIM, bias=False) for _ in range(LAYERS)]
    if layer_cls is LowRankGradLinear:
        layers = [LowRankGradLinear.from_linear(lin) for lin in layers]
    elif layer_cls is QLinear:
        layers = [QLinear.from_linear(lin, group_size=64) for lin in layers]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("kind", ["linear", "lowrank", "qlinear", "qlinear-layerwise"])
def test_no_weight_sized_tensor_between_refreshes(kind):
    """Three 1024×1024 weights (4 MiB in fp32) and 8 tokens of activations (32 KiB). A step of
    plain Linear + GaLore allocates 4 MiB gradients (the control: the trace sees them); with
    LowRankGradLinear + GaLore, and with QLinear + Q-GaLore (plain and layer-wise) no allocation in
    forward, backward or the step reaches half a weight's fp32 size: R comes from lowrank_grad, the
    fused step (galore_adam_step_*) updates W in place and an INT8 W a 1 MiB block of rows at a time,
    and the QLinear matmuls decode Ŵ in blocks of at most 1 MiB (C++ kernels' scratch)."""
    layer_cls = {"linear": torch.nn.Linear, "lowrank": LowRankGradLinear}.get(kind, QLinear)
    model = _stack(layer_cls)
    weights = [m.weight for m in model]
    group = {"params": weights, "rank": 16, "update_proj_gap": 100}
    if layer_cls is QLinear:
        opt = QGaLoreAdamW([{**group, "proj_group_size": 16}], lr=1e-3)
    else:
        opt = GaLoreAdamW([{**group, "projector": "randomized"}], lr=1e-3)
    x = torch.randn(8, DIM, requires_grad=True)
    lw = layerwise(model, opt) if kind.endswith("layerwise") else None

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if lw is None:
            opt.step()
        else:
            lw.finish_step()

    step()  # k = 0: the refresh (full G, SVD) and the states
    sizes = _allocations(step)  # k = 1
    weight_bytes = DIM * DIM * 4
    big = [s for s in sizes if s >= weight_bytes // 2]
    if kind == "linear":
        assert big.count(weight_bytes) >= LAYERS  # the full gradients
    else:
        assert big == [], f"{kind}: allocations of {big} bytes in a non-refresh step"


# ------------------------------------------------------------------------------------------------
# Hugging Face Llama (transformers is installed with the test extra, as a dependency of fira)
# ------------------------------------------------------------------------------------------------


def _hf_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def _train_hf(model, opt, batches):
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_hugging_face_llama_converts_and_trains_the_same():
    batches = token_batches(8)
    base = _hf_llama()
    base_losses = _train_hf(base, galore(base), batches)
    model = lowrank_grad_model(_hf_llama())
    assert sum(isinstance(m, LowRankGradLinear) for m in model.modules()) == N_LOWRANK
    with OpCounter() as counter:
        losses = _train_hf(model, galore(model), batches)
    assert counter.calls["fastgrad.lowrank_grad"] == N_LOWRANK * sum(k % GAP != 0 for k in range(8))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=1e-5, atol=0)


def test_hugging_face_llama_trains_with_qgalore():
    model = quantize_model(_hf_llama(), 32)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == N_LOWRANK
    with OpCounter() as counter:
        losses = _train_hf(model, qgalore(model), token_batches(8, seed=3) * 1)
    assert counter.calls["fastgrad.lowrank_grad_quantized"] == N_LOWRANK * sum(k % GAP != 0 for k in range(8))
    assert all(torch.isfinite(torch.tensor(losses)))
