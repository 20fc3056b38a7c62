"""Layer-wise (per-parameter, fused-backward) stepping: accumulation across a projector refresh,
exact global clipping, the LR clock, the NaN/Inf policy, exact resume, peak memory and DDP (gloo,
2 processes); and the streaming mode (updates in the hooks): bitwise the same training, per-parameter
NaN/Inf policy, activation checkpointing, memory, DDP."""

import copy
import io
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optim_common import (
    N_LOWRANK,
    OpCounter,
    assert_same_state,
    make_galore_muon,
    make_muon,
    make_muon8,
    make_qgalore_muon,
    tiny_model,
)
from optim_common import token_batches as shared_token_batches

from fastgrad.nn import lowrank_grad_model, projected_grad, qlinear_of, quantize_model
from fastgrad.optim import FiraAdamW, GaLoreAdamW, QGaLoreAdamW, galore_param_groups, layerwise, qgalore_param_groups
from fastgrad.optim.layerwise import StreamingLayerwiseOptimizer
from fastgrad.train.profiling import live_peak, measured_memory_events

pytestmark = pytest.mark.usefixtures("single_thread")

RANK, GAP = 16, 3


def token_batches(n: int, rows: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """Eight rows: micro-batches of 2 for accumulation tests."""
    return shared_token_batches(n, rows=rows, seed=seed)


def galore(model, projector="svd", cls=GaLoreAdamW, **opt_kwargs):
    groups = galore_param_groups(model, rank=RANK, update_proj_gap=GAP, scale=0.25, projector=projector)
    return cls(groups, **{"lr": 3e-3, "weight_decay": 0.1, **opt_kwargs})


def lw_step(model, lw, ids, accum):
    """One optimizer step on the batch ``ids`` split into ``accum`` equal micro-batches."""
    rows = ids.shape[0] // accum
    for i in range(accum):
        micro = ids[i * rows : (i + 1) * rows]
        (model(micro, micro) / accum).backward()
    return lw.finish_step()


def plain_step(model, opt, ids, accum=1):
    opt.zero_grad(set_to_none=True)
    rows = ids.shape[0] // accum
    for i in range(accum):
        micro = ids[i * rows : (i + 1) * rows]
        (model(micro, micro) / accum).backward()
    opt.step()


def update_error(model, reference, start) -> float:
    """‖W − W_ref‖ / ‖W_ref − W_0‖ over all parameters: the error relative to the training update
    (comparing weights would hide it under ‖W_0‖)."""
    num = den = 0.0
    for a, b, w0 in zip(model.parameters(), reference.parameters(), start.parameters(), strict=True):
        num += (a - b).detach().double().square().sum().item()
        den += (b - w0).detach().double().square().sum().item()
    return math.sqrt(num / den)


def snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    states = {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for p, st in opt.state.items()
    }
    return weights, states


def assert_unchanged(model, opt, snap):
    weights, states = snap
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    assert {id(p) for p in opt.state} == set(states)
    for p, st in opt.state.items():
        before = states[id(p)]
        assert st.keys() == before.keys()
        for k, v in st.items():
            assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k], k


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------------
# accumulation: 4 micro-batches of b == 1 batch of 4b, across projector refreshes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "random"])
def test_accumulation_matches_big_batch(projector):
    """Tolerance: the three runs differ only in the fp32 summation order of the same gradient
    (per micro-batch and then across them, vs. one batch; Σ down(G_i, P) vs down(Σ G_i, P)), i.e.
    by a few ulps (~1e-7 relative). Adam's per-entry map R ↦ M/(√V+ε) has relative condition ≤ 1,
    an SVD refresh amplifies by 1/(σ_r − σ_{r+1}) relative to ‖G‖; measured, ordinary (non-layer-
    wise) accumulation is itself ~5e-6 away from the big batch after 7 steps. We require the
    layer-wise run to be within 1e-4 of the big batch and within 1e-5 of ordinary accumulation,
    and the layer-wise run without accumulation to be bitwise the non-layer-wise one."""
    start = tiny_model()
    steps = 7  # refreshes at k = 0, 3, 6
    batches = token_batches(steps)
    accum4, big, lw_big, ordinary = (copy.deepcopy(start) for _ in range(4))
    lw4 = layerwise(accum4, lambda m: galore(m, projector), grad_accum_steps=4)
    lw1 = layerwise(lw_big, lambda m: galore(m, projector))
    opt_big, opt_ord = galore(big, projector), galore(ordinary, projector)
    for ids in batches:
        lw_step(accum4, lw4, ids, 4)
        lw_step(lw_big, lw1, ids, 1)
        plain_step(big, opt_big, ids)
        plain_step(ordinary, opt_ord, ids, 4)
    for p in lw4.optimizer.param_groups[0]["params"]:
        assert lw4.optimizer.state[p]["step"] == steps and lw4.optimizer.state[p]["proj_step"] == 6
    for a, b in zip(lw_big.parameters(), big.parameters(), strict=True):
        assert torch.equal(a, b)  # same gradient, same per-parameter math: bitwise
    assert update_error(accum4, big, start) < 1e-4
    assert update_error(accum4, ordinary, start) < 1e-5
    assert update_error(ordinary, big, start) > 0  # the tolerance above is about rounding, not zero


def test_micro_batches_are_projected_in_the_hooks():
    """Between refreshes every micro-batch's gradient goes through fastgrad.ops.lowrank_project
    during backward and no full low-rank gradient is kept; on a refresh step (GaLore needs the whole
    gradient) full gradients are accumulated and projected in the last micro-batch's hooks."""
    model = tiny_model()
    lw = layerwise(model, galore, grad_accum_steps=2)
    lowrank = lw.optimizer.param_groups[0]["params"]
    ids = token_batches(2)
    for k in range(2):  # k = 0 refreshes, k = 1 does not
        for i in range(2):
            micro = ids[k][4 * i : 4 * i + 4]
            with OpCounter() as counter:
                (model(micro, micro) / 2).backward()
            refreshed_now = k == 0 and i == 1
            expected = N_LOWRANK if (k == 1 or refreshed_now) else 0
            assert counter.calls["fastgrad.lowrank_project"] == expected
            assert all(p.grad is None for p in model.parameters())
            kept = {p: lw._slots[p].buf for p in lowrank}
            if k == 1 or refreshed_now:
                assert all(t is None or t.shape != p.shape for p, t in kept.items())
            else:
                assert all(t.shape == p.shape for p, t in kept.items())
            if k == 1:  # only D×r' projected gradients for the low-rank weights, full ones for the rest
                is_lowrank = lambda p: any(p is q for q in lowrank)  # noqa: E731
                expected_bytes = sum(
                    4 * (max(p.shape) * RANK if is_lowrank(p) else p.numel()) for p in model.parameters()
                )
                assert lw.buffer_bytes() == expected_bytes
        with OpCounter() as counter:
            lw.finish_step()
        assert counter.calls["fastgrad.lowrank_project"] == 0
        assert counter.calls["fastgrad.galore_adam_step_"] == N_LOWRANK  # the updates, in finish_step


def test_optimizer_reading_the_full_gradient_gets_it():
    """An optimizer whose update reads p.grad (update_reads_grad, e.g. Fira) sees the accumulated,
    clipped full gradient during the update; with GaLore's rule this is bitwise ordinary accumulation."""

    class ReadsGrad(GaLoreAdamW):
        update_reads_grad = True
        seen: list = []

        def update_group(self, group, items):
            for it in items:
                assert it.param.grad is not None and it.param.grad.shape == it.param.shape
                self.seen.append(it.param)
            super().update_group(group, items)

    start = tiny_model()
    model, ordinary = copy.deepcopy(start), copy.deepcopy(start)
    lw = layerwise(model, lambda m: galore(m, cls=ReadsGrad), grad_accum_steps=2)
    opt = galore(ordinary)
    for ids in token_batches(4):
        lw_step(model, lw, ids, 2)
        plain_step(ordinary, opt, ids, 2)
    assert len(ReadsGrad.seen) == 4 * len(list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), ordinary.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# global clipping: the norm of what the optimizer consumes, against a hand computation
# ------------------------------------------------------------------------------------------------


def test_clipping_uses_the_consumed_norm():
    max_norm = 0.05
    start = tiny_model()
    model, ref = copy.deepcopy(start), copy.deepcopy(start)
    lw = layerwise(model, galore, grad_accum_steps=2, max_grad_norm=max_norm)
    opt = galore(ref)
    lowrank = {id(p) for p in opt.param_groups[0]["params"]}
    for k, ids in enumerate(token_batches(5)):  # refreshes at k = 0 and 3
        stats = lw_step(model, lw, ids, 2)

        opt.zero_grad()
        ref(ids, ids).backward()
        squares = 0.0
        for p in ref.parameters():
            g = p.grad.double()
            if id(p) not in lowrank:
                squares += g.square().sum().item()
            elif k % GAP == 0:  # refresh from this G: ‖R‖² = sum of the r' largest σ²
                squares += torch.linalg.svdvals(g)[:RANK].square().sum().item()
            else:  # the current basis, projected by hand
                proj = opt.state[p]["proj"].double()
                low = proj.t() @ g if p.shape[0] < p.shape[1] else g @ proj.t()
                squares += low.square().sum().item()
        norm = math.sqrt(squares)
        full_norm = math.sqrt(sum(p.grad.double().square().sum().item() for p in ref.parameters()))
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p in ref.parameters():
            p.grad.mul_(coef)
        opt.step()

        assert stats.grad_norm == pytest.approx(norm, rel=1e-5)
        assert norm < full_norm  # the low-rank part of the norm is that of R, not of G
        assert stats.clip_coef == pytest.approx(coef, rel=1e-5) and coef < 0.5  # clipping really acts
        assert not stats.skipped and stats.step == k + 1
        assert update_error(model, ref, start) < 1e-4


# ------------------------------------------------------------------------------------------------
# the LR clock: one set_lr per optimizer step, one update per parameter per step
# ------------------------------------------------------------------------------------------------


def test_lr_schedule_runs_at_optimizer_step_speed():
    log = []

    class LrSpy(GaLoreAdamW):
        def update_group(self, group, items):
            log.extend((it.param, group["lr"], it.state["step"]) for it in items)
            super().update_group(group, items)

    def schedule(k):
        return 1e-3 * (k + 1) if k < 3 else 3e-3 * 0.5 ** (k - 2)

    model = tiny_model()
    lw = layerwise(model, lambda m: galore(m, cls=LrSpy), grad_accum_steps=2)
    params = list(model.parameters())
    for k, ids in enumerate(token_batches(7)):
        lw.set_lr(schedule(k))
        log.clear()
        lw_step(model, lw, ids, 2)
        assert sorted(id(p) for p, _, _ in log) == sorted(id(p) for p in params)  # once each
        assert all(lr == schedule(k) for _, lr, _ in log)
        assert all(step == k for _, _, step in log)  # 0-based step counter: one tick per step
        for p in lw.optimizer.param_groups[0]["params"]:  # the refresh clock is not doubled either
            assert lw.optimizer.state[p]["proj_step"] == GAP * (k // GAP)


# ------------------------------------------------------------------------------------------------
# NaN / Inf: the whole step is skipped (or raises), nothing changes, refreshes are rolled back
# ------------------------------------------------------------------------------------------------


def _poison(param, value):
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    return param.register_hook(hook)


def _poisoned_step(model, lw, ids, poisons):
    """Two micro-batches; ``poisons`` = {micro index: [(param, value)]}."""
    for i in range(2):
        handles = [_poison(p, v) for p, v in poisons.get(i, [])]
        micro = ids[4 * i : 4 * i + 4]
        (model(micro, micro) / 2).backward()
        for h in handles:
            h.remove()
    return lw.finish_step()


def test_nonfinite_gradient_skips_the_whole_step():
    model = tiny_model()
    lw = layerwise(model, galore, grad_accum_steps=2, max_grad_norm=1.0)
    opt = lw.optimizer
    batches = token_batches(6)
    lowrank = model.model.layers[0].mlp.down_proj.weight
    embed = model.model.embed_tokens.weight
    for ids in batches[:1]:
        lw_step(model, lw, ids, 2)

    # between refreshes (projected accumulation): NaN in a low-rank weight's 2nd micro-batch, Inf in the embedding
    snap = snapshot(model, opt)
    stats = _poisoned_step(model, lw, batches[1], {0: [(embed, float("inf"))], 1: [(lowrank, float("nan"))]})
    assert stats.skipped and not math.isfinite(stats.grad_norm) and stats.clip_coef == 1.0
    assert opt.nonfinite_steps == 1
    assert_unchanged(model, opt, snap)

    lw_step(model, lw, batches[2], 2)
    lw_step(model, lw, batches[3], 2)  # steps 1, 2 done: the next step (k = 3) refreshes every projector
    assert opt.state[lowrank]["step"] == 3

    # refresh step: the other weights refresh in their hooks, then must be rolled back
    snap = snapshot(model, opt)
    stats = _poisoned_step(model, lw, batches[4], {1: [(lowrank, float("nan"))]})
    assert stats.skipped and math.isnan(stats.grad_norm) and opt.nonfinite_steps == 2
    assert_unchanged(model, opt, snap)

    stats = lw_step(model, lw, batches[4], 2)  # clean: refreshes now
    assert not stats.skipped and math.isfinite(stats.grad_norm)
    assert all(opt.state[p]["proj_step"] == 3 and opt.state[p]["step"] == 4 for p in opt.param_groups[0]["params"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_at_a_gradient_free_refresh():
    """The random projector refreshes in the first micro-batch's hook (it needs no gradient) and
    accumulates in low rank: a NaN there must still skip the step and undo the refresh."""
    model = tiny_model()
    lw = layerwise(model, lambda m: galore(m, "random"), grad_accum_steps=2)
    opt = lw.optimizer
    batches = token_batches(5)
    for ids in batches[:3]:
        lw_step(model, lw, ids, 2)
    snap = snapshot(model, opt)
    bad = model.model.layers[1].self_attn.v_proj.weight
    stats = _poisoned_step(model, lw, batches[3], {0: [(bad, float("nan"))]})
    assert stats.skipped and opt.nonfinite_steps == 1
    assert_unchanged(model, opt, snap)
    assert not lw_step(model, lw, batches[4], 2).skipped
    assert all(opt.state[p]["proj_step"] == 3 for p in opt.param_groups[0]["params"])


def test_nonfinite_gradient_raise_policy():
    model = tiny_model()
    lw = layerwise(model, lambda m: galore(m, nonfinite="raise"), grad_accum_steps=2)
    batches = token_batches(3)
    lw_step(model, lw, batches[0], 2)
    snap = snapshot(model, lw.optimizer)
    bad = model.model.layers[1].mlp.up_proj.weight
    with pytest.raises(FloatingPointError, match=r"\(160, 64\)"):
        _poisoned_step(model, lw, batches[1], {0: [(bad, float("nan"))]})
    assert_unchanged(model, lw.optimizer, snap)
    assert not lw.optimizer.state_dict()["state"] == {} and lw.optimizer.nonfinite_steps == 1
    assert not lw_step(model, lw, batches[2], 2).skipped  # the driver is ready for the next step


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "random"])
def test_resume_is_exact(projector):
    batches = token_batches(7)
    factory = lambda m: galore(m, projector)  # noqa: E731
    # A learning rate that changes every step: a resumed driver must read the restored groups'
    # learning rate, not that of the group dicts it indexed before load_state_dict replaced them.
    lr_at = lambda k: 1e-3 * (k + 1)  # noqa: E731
    model = tiny_model()
    lw = layerwise(model, factory, grad_accum_steps=2, max_grad_norm=0.1)
    for k, ids in enumerate(batches):
        lw.set_lr(lr_at(k))
        lw_step(model, lw, ids, 2)

    first = tiny_model()
    lw1 = layerwise(first, factory, grad_accum_steps=2, max_grad_norm=0.1)
    for k, ids in enumerate(batches[:4]):
        lw1.set_lr(lr_at(k))
        lw_step(first, lw1, ids, 2)
    (first(batches[4][:4], batches[4][:4]) / 2).backward()
    with pytest.raises(RuntimeError, match="step boundary"):
        lw1.state_dict()
    lw1.zero_grad()  # drop the partial step
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(lw1.state_dict())

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved_model)
    lw2 = layerwise(resumed, factory, grad_accum_steps=2, max_grad_norm=0.1)
    lw2.load_state_dict(saved_opt)
    assert lw2.steps == 4
    for k, ids in enumerate(batches[4:], start=4):  # crosses the refresh at k = 6
        lw2.set_lr(lr_at(k))
        lw_step(resumed, lw2, ids, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------
# peak memory (torch.profiler memory events on CPU)
# ------------------------------------------------------------------------------------------------


def _profiled_peak(fn) -> int:
    """Peak of the bytes allocated minus freed during ``fn`` (profiler memory events, in order)."""
    return live_peak(measured_memory_events(fn))


@pytest.mark.parametrize(("accum", "refresh"), [(1, False), (1, True), (4, False)])
def test_peak_memory_is_one_gradient(accum, refresh):
    """Four 1024×1024 Linear weights (4 MiB gradients each) with tiny activations. Non-layer-wise,
    all gradients are alive at once; layer-wise, one (plus the 1024×32 projected ones, which the
    non-layer-wise step also holds). Peak = max over the step of (bytes allocated − bytes freed)
    since its start, from the profiler's memory events."""
    dim, layers = 1024, 4

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])
        groups = [
            {
                "params": list(model.parameters()),
                "rank": 32,
                "update_proj_gap": 1 if refresh else 100,
                "projector": "randomized",
            }
        ]
        return model, GaLoreAdamW(groups, lr=1e-3)

    x = torch.randn(8, dim)

    def backward(model):
        for _ in range(accum):
            (model(x).square().mean() / accum).backward()

    model, opt = make()
    lw_model, lw_opt = make()
    lw = layerwise(lw_model, lw_opt, grad_accum_steps=accum)
    for _ in range(2):  # initialise the states (and the DCT/randomized caches) outside the profile

        def plain():
            opt.zero_grad(set_to_none=True)
            backward(model)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def layer_wise():
            backward(lw_model)
            lw.finish_step()

        plain()
        layer_wise()
    peak_plain, peak_lw = _profiled_peak(plain), _profiled_peak(layer_wise)
    grad_bytes = [p.numel() * p.element_size() for p in model.parameters()]
    saving = sum(grad_bytes) - max(grad_bytes)
    print(
        f"accum={accum} refresh={refresh}: peak {peak_plain / 2**20:.2f} MiB non-layer-wise, "
        f"{peak_lw / 2**20:.2f} MiB layer-wise (bound: saving >= {saving / 2**20:.0f} MiB)"
    )
    # Both peaks fall in the same place (the last weight's refresh, or its update), with the same
    # projected gradients and temporaries; they differ by the gradients only, up to a few 0-d
    # tensors (bytes) that are alive in one path and not the other.
    assert peak_plain - peak_lw >= saving - 1024
    for a, b in zip(model.parameters(), lw_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)  # the same training


# ------------------------------------------------------------------------------------------------
# DDP: 2 processes (gloo, CPU) == 1 process with the global batch
# ------------------------------------------------------------------------------------------------

DDP_STEPS = 5
DDP_POISONED = 1  # at this step rank 1 alone gets a NaN gradient: every rank must skip it


def muon_fp32(model):
    """Muon with Newton–Schulz in fp32: a bf16 cast would turn the all-reduce's fp32 rounding of G
    into bf16 ulps (4e-3) of a few entries of U."""
    return make_muon(model, opt_kwargs={"ns_dtype": torch.float32})


DDP_FACTORIES = {"galore": galore, "muon": muon_fp32}


def _ddp_worker(rank, world, init_file, out_dir, streaming=False, setup="galore"):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model(seed=rank)  # rank 1 starts elsewhere: the driver broadcasts rank 0's weights
        clip = None if streaming else 0.1
        lw = layerwise(model, DDP_FACTORIES[setup], grad_accum_steps=2, max_grad_norm=clip, streaming=streaming)
        rows = 8 // world
        stats = []
        for k, ids in enumerate(token_batches(DDP_STEPS)):
            local = ids[rank * rows : (rank + 1) * rows]
            poison = rank == 1 and k == DDP_POISONED
            handle = _poison(model.model.layers[0].self_attn.q_proj.weight, math.nan) if poison else None
            (model(local[:2], local[:2]) / 2).backward()
            if handle is not None:
                handle.remove()
            (model(local[2:], local[2:]) / 2).backward()
            stats.append(lw.finish_step())
        result = {
            "params": [p.detach() for p in model.parameters()],
            "norms": [s.grad_norm for s in stats],
            "skipped": [s.skipped for s in stats],
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("setup", list(DDP_FACTORIES))
def test_ddp_two_processes_match_one(setup):
    """2 ranks × 2 micro-batches of 2 sequences, gradients averaged by the driver (GaLore's low-rank
    ones in low rank; Muon's full ones, orthogonalized by every rank alike), vs. one process
    stepping on the 8-sequence batches (the poisoned step left out)."""
    start = tiny_model()
    single = copy.deepcopy(start)
    lw = layerwise(single, DDP_FACTORIES[setup], grad_accum_steps=1, max_grad_norm=0.1)
    batches = token_batches(DDP_STEPS)
    norms = [lw_step(single, lw, ids, 1).grad_norm for k, ids in enumerate(batches) if k != DDP_POISONED]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, f"{tmp}/rendezvous", tmp, False, setup), nprocs=2, join=True)
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)  # the replicas stay identical
    for r in results:
        assert r["skipped"] == [k == DDP_POISONED for k in range(DDP_STEPS)]
        assert math.isnan(r["norms"][DDP_POISONED])
        ddp_norms = [n for k, n in enumerate(r["norms"]) if k != DDP_POISONED]
        assert ddp_norms == pytest.approx(norms, rel=1e-5)  # refreshes at k = 0 and 4 included
    ddp = copy.deepcopy(start)
    with torch.no_grad():
        for p, w in zip(ddp.parameters(), results[0]["params"], strict=True):
            p.copy_(w)
    error = update_error(ddp, single, start)
    print(f"{setup}: update error {error:.1e}")
    assert error < 1e-4


def test_ddp_wrapped_model_is_rejected():
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        layerwise(wrapped, galore)


# ------------------------------------------------------------------------------------------------
# misuse is a clear error
# ------------------------------------------------------------------------------------------------


def test_misuse_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(TypeError, match="LowRankOptimizer"):
        layerwise(model, lambda m: torch.optim.AdamW(m.parameters()))
    with pytest.raises(ValueError, match="never be updated"):
        layerwise(model, lambda m: GaLoreAdamW([galore_param_groups(m, rank=8)[0]]))  # no embeddings, norms, head
    with pytest.raises(ValueError, match="grad_accum_steps"):
        layerwise(model, galore, grad_accum_steps=0)

    lw = layerwise(model, galore, grad_accum_steps=2)
    ids = token_batches(1)[0]
    model(ids, ids).backward()
    with pytest.raises(RuntimeError, match="1 backward pass"):
        lw.finish_step()
    model(ids, ids).backward()
    with pytest.raises(RuntimeError, match="more than grad_accum_steps=2"):
        model(ids, ids).backward()
    lw.zero_grad()
    assert not lw_step(model, lw, ids, 2).skipped
    lw.remove_hooks()
    model(ids, ids).backward()
    assert model.lm_head.weight.grad is not None  # detached: gradients stay on the parameters


# ------------------------------------------------------------------------------------------------
# streaming: each parameter updated in its hook (the reference implementations' way)
# ------------------------------------------------------------------------------------------------


def qgalore(model):
    groups = qgalore_param_groups(model, rank=8, update_proj_gap=GAP, proj_group_size=8)
    return QGaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)


def adamw_only(model):
    """Every parameter in groups without 'rank': plain AdamW (two groups, to cover several)."""
    params = list(model.parameters())
    return GaLoreAdamW([{"params": params[::2]}, {"params": params[1::2], "lr": 1e-3}], lr=3e-3, weight_decay=0.1)


STREAMING_SETUPS = {
    # name: (model builder, optimizer factory)
    "galore": (tiny_model, galore),
    "galore-random": (tiny_model, lambda m: galore(m, "random")),
    "qgalore-int8": (lambda: quantize_model(tiny_model(), 32), qgalore),  # QLinear: grad-ready hooks
    "lowrank-grad": (lambda: lowrank_grad_model(tiny_model()), galore),  # R delivered by the layers
    "adamw": (tiny_model, adamw_only),
    # the Muon family: Muon and Muon8bit (every weight a full-rank slot, Newton–Schulz in the
    # update), GaLoreMuon on R delivered by the layers, QGaLoreMuon on INT8 QLinear weights
    "muon": (tiny_model, make_muon),
    "muon8bit": (tiny_model, make_muon8),
    "galore-muon": (lambda: lowrank_grad_model(tiny_model()), lambda m: make_galore_muon(m, rank=8, gap=GAP)),
    "q-galore-muon": (
        lambda: quantize_model(tiny_model(), 32),
        lambda m: make_qgalore_muon(m, rank=8, gap=GAP, proj_group_size=8),
    ),
}
MUON_FAMILY = ("muon", "muon8bit", "galore-muon", "q-galore-muon")


def _steps(model, lw, batches, accum, lrs=None):
    stats = []
    for k, ids in enumerate(batches):
        if lrs is not None:
            lw.set_lr(lrs[k])
        stats.append(lw_step(model, lw, ids, accum))
    return stats


def assert_same_training(model_a, lw_a, model_b, lw_b):
    """Bitwise the same weights (QLinear codes, scales and zeros included) and optimizer state."""
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = lw_a.state_dict(), lw_b.state_dict()
    assert sa["layerwise"]["steps"] == sb["layerwise"]["steps"]
    assert sa["optimizer"]["nonfinite_steps"] == sb["optimizer"]["nonfinite_steps"]
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    for idx, st in sa["optimizer"]["state"].items():
        other = sb["optimizer"]["state"][idx]
        assert st.keys() == other.keys(), idx
        for k, v in st.items():
            assert torch.equal(v, other[k]) if isinstance(v, torch.Tensor) else v == other[k], (idx, k)


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("setup", list(STREAMING_SETUPS))
def test_streaming_is_bitwise_the_deferred_step(setup, accum):
    """Without clipping and with finite gradients, updating each parameter in its hook is the same
    arithmetic as updating all of them in finish_step: bitwise, over refresh (k = 0, 3, 6) and
    non-refresh steps, with a learning rate that changes every step. The driver holds nothing after
    backward, and the reported norm is the same."""
    build, factory = STREAMING_SETUPS[setup]
    batches = token_batches(7, rows=6)
    lrs = [2e-3 * (k + 1) for k in range(7)]
    deferred, streamed = build(), build()
    lw_d = layerwise(deferred, factory, grad_accum_steps=accum)
    lw_s = layerwise(streamed, factory, grad_accum_steps=accum, streaming=True)
    assert lw_s.streaming and not lw_d.streaming
    rows = 6 // accum
    for k, ids in enumerate(batches):
        lw_d.set_lr(lrs[k])
        lw_s.set_lr(lrs[k])
        for i in range(accum):
            micro = ids[i * rows : (i + 1) * rows]
            (deferred(micro, micro) / accum).backward()
            (streamed(micro, micro) / accum).backward()
        assert lw_d.buffer_bytes() > 0
        assert lw_s.buffer_bytes() == 0  # every parameter was updated and released in its hook
        assert all(p.grad is None for p in streamed.parameters())
        sd, ss = lw_d.finish_step(), lw_s.finish_step()
        assert ss == sd and not ss.skipped and ss.clip_coef == 1.0 and math.isfinite(ss.grad_norm)
    assert_same_training(deferred, lw_d, streamed, lw_s)


def test_streaming_updates_during_backward():
    """The update happens in the last micro-batch's backward: the weights have changed before
    finish_step, the earlier micro-batches change nothing, and the learning rate set before the
    last backward is the one used (set_lr after it is too late for this step)."""
    log = []

    class LrSpy(GaLoreAdamW):
        def update_group(self, group, items):
            log.extend((it.param, group["lr"]) for it in items)
            super().update_group(group, items)

    model = tiny_model()
    lw = layerwise(model, lambda m: galore(m, cls=LrSpy), grad_accum_steps=2, streaming=True)
    ids = token_batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    lw.set_lr(1e-3)
    (model(ids[:4], ids[:4]) / 2).backward()
    assert not log and all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    (model(ids[4:], ids[4:]) / 2).backward()
    assert sorted(id(p) for p, _ in log) == sorted(id(p) for p in model.parameters())  # once each
    assert all(lr == 1e-3 for _, lr in log)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    lw.set_lr(5.0)  # after the last backward: not this step's
    after = [p.detach().clone() for p in model.parameters()]
    stats = lw.finish_step()
    assert stats.step == 1 and not stats.skipped
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after, strict=True))
    assert all(lw.optimizer.state[p]["step"] == 1 for p in model.parameters())


def test_streaming_with_an_optimizer_reading_the_full_gradient():
    """Fira (update_reads_grad) sees p.grad = its accumulated gradient during its update in the
    hook; bitwise the deferred layer-wise run."""
    seen = []

    class FiraSpy(FiraAdamW):
        def update_group(self, group, items):
            for it in items:
                assert it.param.grad is not None and it.param.grad.shape == it.param.shape
                seen.append(it.param)
            super().update_group(group, items)

    def fira(model):
        return FiraSpy(galore_param_groups(model, rank=RANK, update_proj_gap=GAP), lr=3e-3, weight_decay=0.1)

    deferred, streamed = tiny_model(), tiny_model()
    lw_d = layerwise(deferred, fira, grad_accum_steps=2)
    lw_s = layerwise(streamed, fira, grad_accum_steps=2, streaming=True)
    batches = token_batches(4)
    _steps(deferred, lw_d, batches, 2)
    seen.clear()
    _steps(streamed, lw_s, batches, 2)
    assert len(seen) == 4 * len(list(streamed.parameters()))
    assert all(p.grad is None for p in streamed.parameters())
    assert_same_training(deferred, lw_d, streamed, lw_s)


@pytest.mark.parametrize(("setup", "accum"), [("galore", 3), ("qgalore-int8", 1), ("lowrank-grad", 2)])
def test_streaming_with_activation_checkpointing(setup, accum):
    """Non-reentrant checkpointing recomputes a decoder layer in backward: its weights must be
    updated only after that layer's backward, recomputation included, and before the previous
    layer is recomputed (the update really streams). Same training as without streaming."""
    build, factory = STREAMING_SETUPS[setup]
    events = []
    deferred, streamed = build(), build()
    for m in (deferred, streamed):
        m.gradient_checkpointing = True
    layers = list(streamed.model.layers)
    layer_of = {p: i for i, layer in enumerate(layers) for p in layer.parameters()}

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: events.append(("forward", i)))

    class Spy:
        def __init__(self, opt):
            self.update_group = opt.update_group
            opt.update_group = self

        def __call__(self, group, items):
            events.extend(("update", layer_of[it.param]) for it in items if it.param in layer_of)
            return self.update_group(group, items)

    lw_d = layerwise(deferred, factory, grad_accum_steps=accum)
    lw_s = layerwise(streamed, factory, grad_accum_steps=accum, streaming=True)
    Spy(lw_s.optimizer)
    batches = token_batches(4, rows=6)
    _steps(deferred, lw_d, batches, accum)
    for ids in batches:
        events.clear()
        lw_step(streamed, lw_s, ids, accum)
        # Each micro-batch: forward 0, 1, then backward recomputes 1 and 0; in the last one layer 1's
        # weights are updated after its recomputation and before layer 0's, and layer 0's after it.
        stepped = {p for group in lw_s.param_groups for p in group["params"]}  # not a QLinear's scales
        updates = [[("update", i)] * sum(p in stepped for p in layer.parameters()) for i, layer in enumerate(layers)]
        micro = [("forward", 0), ("forward", 1), ("forward", 1), ("forward", 0)]
        assert events == micro * (accum - 1) + [*micro[:3], *updates[1], micro[3], *updates[0]]
    assert_same_training(deferred, lw_d, streamed, lw_s)


def test_streaming_refuses_clipping():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"streaming=True cannot clip \(max_grad_norm=1.0\).*streaming=False"):
        layerwise(model, galore, max_grad_norm=1.0, streaming=True)


@pytest.mark.parametrize("refresh", [False, True])
def test_streaming_nonfinite_gradient_skips_that_parameter_only(refresh):
    """A NaN in one weight's gradient (in the first of two micro-batches) leaves that weight, its
    moments and its projector (a refresh is rolled back) as they were; every other parameter takes
    exactly the update of a step without the NaN. The step counts once as non-finite and reports a
    NaN norm, but is not 'skipped' (other parameters were updated)."""
    batches = token_batches(5)
    warm = 3 if refresh else 1  # step 3 refreshes every projector, step 1 does not
    clean, poisoned = tiny_model(), tiny_model()
    lw_c = layerwise(clean, galore, grad_accum_steps=2, streaming=True)
    lw_p = layerwise(poisoned, galore, grad_accum_steps=2, streaming=True)
    _steps(clean, lw_c, batches[:warm], 2)
    _steps(poisoned, lw_p, batches[:warm], 2)
    bad = poisoned.model.layers[0].mlp.down_proj.weight
    bad_before = bad.detach().clone()
    state_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in lw_p.optimizer.state[bad].items()}

    lw_step(clean, lw_c, batches[warm], 2)
    stats = _poisoned_step(poisoned, lw_p, batches[warm], {0: [(bad, float("nan"))]})
    assert math.isnan(stats.grad_norm) and not stats.skipped and stats.clip_coef == 1.0
    assert lw_p.optimizer.nonfinite_steps == 1 and lw_p.steps == warm + 1
    assert torch.equal(bad, bad_before)
    st = lw_p.optimizer.state[bad]
    assert st.keys() == state_before.keys()
    for k, v in st.items():
        assert torch.equal(v, state_before[k]) if isinstance(v, torch.Tensor) else v == state_before[k], k
    assert st["step"] == warm and lw_c.optimizer.state[clean.model.layers[0].mlp.down_proj.weight]["step"] == warm + 1
    for (name, a), b in zip(poisoned.named_parameters(), clean.parameters(), strict=True):
        if a is not bad:
            assert torch.equal(a, b), name
    assert not lw_step(poisoned, lw_p, batches[warm + 1], 2).skipped  # and on it goes
    assert lw_p.optimizer.nonfinite_steps == 1


def test_streaming_all_parameters_nonfinite_is_a_skipped_step():
    model = tiny_model()
    lw = layerwise(model, galore, grad_accum_steps=2, streaming=True)
    batches = token_batches(3)
    lw_step(model, lw, batches[0], 2)
    snap = snapshot(model, lw.optimizer)
    ids = batches[1]
    (model(ids[:4], ids[:4]) / 2).backward()
    (model(ids[4:], ids[4:]) * math.nan).backward()  # every gradient is NaN
    stats = lw.finish_step()
    assert stats.skipped and math.isnan(stats.grad_norm) and stats.step == 2
    assert lw.optimizer.nonfinite_steps == 1  # once per step, not once per parameter
    assert_unchanged(model, lw.optimizer, snap)
    assert not lw_step(model, lw, batches[2], 2).skipped


def test_streaming_raise_policy_is_not_all_or_nothing():
    """nonfinite='raise': FloatingPointError out of backward() at the bad weight's hook. Weights
    updated earlier in that backward (later layers, the head) keep their update; the bad weight and
    the ones backward had not reached (layer 0's attention, the embedding) are unchanged. The driver
    is ready for the next step."""
    model = tiny_model()
    lw = layerwise(model, lambda m: galore(m, nonfinite="raise"), streaming=True)
    batches = token_batches(3)
    lw_step(model, lw, batches[0], 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bad = model.model.layers[0].mlp.up_proj.weight
    handle = _poison(bad, math.nan)
    with pytest.raises(FloatingPointError, match=r"\(160, 64\).*not all-or-nothing"):
        model(batches[1], batches[1]).backward()
    handle.remove()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "lm_head.weight" in changed and "model.layers.1.mlp.up_proj.weight" in changed
    assert "model.layers.0.mlp.up_proj.weight" not in changed
    assert not changed & {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    assert lw.optimizer.nonfinite_steps == 1 and lw.steps == 2
    lw.state_dict()  # at a step boundary
    assert not lw_step(model, lw, batches[2], 1).skipped
    assert all(p.grad is None for p in model.parameters())


def test_streaming_zero_grad_mid_step_warns_that_updates_stay():
    model = tiny_model()
    lw = layerwise(model, galore, grad_accum_steps=2, streaming=True)
    batches = token_batches(3)
    ids = batches[0]
    # After the first micro-batch nothing is updated yet: zero_grad drops it silently, as without streaming.
    (model(ids[:4], ids[:4]) / 2).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lw.zero_grad()

    def boom(grad):
        raise RuntimeError("boom")

    (model(ids[:4], ids[:4]) / 2).backward()
    handle = model.model.layers[0].self_attn.q_proj.weight.register_hook(boom)  # mid-way through backward
    with pytest.raises(RuntimeError, match="boom"):
        (model(ids[4:], ids[4:]) / 2).backward()
    handle.remove()
    with pytest.raises(RuntimeError, match="step boundary"):
        lw.state_dict()
    with pytest.warns(RuntimeWarning, match=r"cannot undo the updates of the \d+ parameter"):
        lw.zero_grad()
    assert lw.buffer_bytes() == 0 and lw.steps == 0
    assert not lw_step(model, lw, batches[1], 2).skipped


def test_streaming_checkpoints_are_interchangeable():
    """A state saved by a streaming driver resumes a non-streaming one (and back), bitwise."""
    batches = token_batches(7)
    straight = tiny_model()
    lw = layerwise(straight, galore, grad_accum_steps=2)
    _steps(straight, lw, batches, 2)

    first = tiny_model()
    lw1 = layerwise(first, galore, grad_accum_steps=2, streaming=True)
    _steps(first, lw1, batches[:4], 2)
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(lw1.state_dict())
    assert saved_opt["layerwise"]["streaming"]
    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved_model)
    lw2 = layerwise(resumed, galore, grad_accum_steps=2)
    lw2.load_state_dict(saved_opt)
    _steps(resumed, lw2, batches[4:], 2)
    assert_same_training(straight, lw, resumed, lw2)


def test_streaming_peak_memory_holds_no_projected_gradients():
    """Eight 1024×1024 low-rank weights at rank 256 (1 MiB projected gradients R), tiny activations,
    no refresh. Without streaming the driver holds every R at the end of backward (8 MiB) and the
    step's peak has them all alive at once (with the last weight's 4 MiB G: 12 MiB); with streaming
    it holds nothing and at most one R is alive beyond backward's own tensors, so the peak is lower
    by (number of weights − 1) R's minus the update's transients, which now come during backward:
    its temporaries (measured: 96 KiB; a non-fused update would make one D×r' N = M/(√V+ε), one R)
    and the copy of the weight and moments that the on-device NaN/Inf skip restores from (4 + 2 MiB:
    with four weights it would outweigh the saving). We require 2 R's (more than the largest R).
    Same training."""
    dim, layers, rank = 1024, 8, 256

    def make(streaming):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])
        groups = [{"params": list(model.parameters()), "rank": rank, "update_proj_gap": 100, "projector": "randomized"}]
        return model, layerwise(model, GaLoreAdamW(groups, lr=1e-3), streaming=streaming)

    x = torch.randn(8, dim)
    runs = {}
    for streaming in (False, True):
        model, lw = make(streaming)
        held = []

        def step(model=model, lw=lw, held=held):
            model(x).square().mean().backward()
            held.append(lw.buffer_bytes())
            lw.finish_step()

        step()  # step 0 refreshes (and initialises the states) outside the profile
        held.clear()
        runs[streaming] = (model, live_peak(measured_memory_events(step)), held[0])
    r_bytes = dim * rank * 4
    (model_d, peak_d, held_d), (model_s, peak_s, held_s) = runs[False], runs[True]
    print(f"held after backward {held_d / 2**20:.2f} / {held_s / 2**20:.2f} MiB, peak {peak_d / 2**20:.2f} / "
          f"{peak_s / 2**20:.2f} MiB (deferred / streaming)")  # fmt: skip
    assert held_d == layers * r_bytes and held_s == 0
    assert peak_d - peak_s >= 2 * r_bytes
    for a, b in zip(model_d.parameters(), model_s.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ddp_streaming_two_processes_match_one():
    """Streaming under a process group (each hook waits for its all-reduce): 2 ranks × 2
    micro-batches match one process with the 8-sequence batches. At DDP_POISONED rank 1 alone has a
    NaN in layer 0's q_proj gradient: after the all-reduce every rank skips that weight only, as one
    process poisoned the same way does; the replicas stay identical."""
    single = tiny_model()
    lw = layerwise(single, galore, grad_accum_steps=1, streaming=True)
    norms = []
    for k, ids in enumerate(token_batches(DDP_STEPS)):
        poison = k == DDP_POISONED
        handle = _poison(single.model.layers[0].self_attn.q_proj.weight, math.nan) if poison else None
        norms.append(lw_step(single, lw, ids, 1).grad_norm)
        if handle is not None:
            handle.remove()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, f"{tmp}/rendezvous", tmp, True), nprocs=2, join=True)
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)
    for r in results:
        assert r["skipped"] == [False] * DDP_STEPS
        assert math.isnan(r["norms"][DDP_POISONED])
        clean = [n for k, n in enumerate(r["norms"]) if k != DDP_POISONED]
        assert clean == pytest.approx([n for k, n in enumerate(norms) if k != DDP_POISONED], rel=1e-5)
    ddp = tiny_model()
    start = tiny_model()
    with torch.no_grad():
        for p, w in zip(ddp.parameters(), results[0]["params"], strict=True):
            p.copy_(w)
    assert update_error(ddp, single, start) < 1e-4


# ------------------------------------------------------------------------------------------------
# the Muon family layer-wise: the plain step's arithmetic, per weight in the hooks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("setup", MUON_FAMILY)
def test_muon_family_layerwise_is_the_plain_step(setup, streaming):
    """One backward per step: the driver's updates (all in finish_step, or each weight's in its
    hook) are bitwise the optimizer's own step over 7 steps, refreshes at k = 0, 3, 6 included
    (GaLoreMuon's momentum carried into each new basis; QGaLoreMuon's INT8 codes, scales and zeros
    by stochastic rounding), with a learning rate that changes every step. Midway the driver's
    state is saved and loaded into a driver of the other kind (streaming <-> deferred), which goes
    on bitwise."""
    build, factory = STREAMING_SETUPS[setup]
    batches = token_batches(7, rows=6)
    plain, driven = build(), build()
    opt = factory(plain)
    lw = layerwise(driven, factory, streaming=streaming)
    for k, ids in enumerate(batches):
        lr = 0.01 * (k + 1)
        for group in opt.param_groups:
            group["lr"] = lr if group["use_muon"] else lr / 10
        for group in lw.param_groups:
            group["lr"] = lr if group["use_muon"] else lr / 10
        plain_step(plain, opt, ids)
        stats = lw_step(driven, lw, ids, 1)
        assert not stats.skipped and math.isfinite(stats.grad_norm)
        if k == 3:
            saved = _roundtrip(lw.state_dict())
            lw.remove_hooks()
            lw = layerwise(driven, factory, streaming=not streaming)
            lw.load_state_dict(saved)
    for (name, a), b in zip(plain.state_dict().items(), driven.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ref = opt.state_dict()["state"]
    got = lw.optimizer.state_dict()["state"]
    assert ref.keys() == got.keys()
    for idx, st in ref.items():
        for key, value in st.items():
            other = got[idx][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (idx, key)


def test_muon_layerwise_accumulation_and_clipping_match_the_plain_step():
    """3 micro-batches, clipped to 0.05 by the global norm: Muon's consumed gradients are the full
    ones, so the driver's norm is clip_grad_norm_'s and the training is ordinary accumulation with
    clipping, up to the fp32 summation order of the accumulated gradients (Newton–Schulz in fp32
    here: the bf16 cast would round a 1-ulp difference to a bf16 ulp, 4e-3, in a few entries).
    Measured 7e-7 relative to the update after 6 steps; we require 1e-5."""
    max_norm = 0.05

    def factory(model):
        return make_muon(model, opt_kwargs={"ns_dtype": torch.float32})

    start = tiny_model()
    model, ref = copy.deepcopy(start), copy.deepcopy(start)
    lw = layerwise(model, factory, grad_accum_steps=3, max_grad_norm=max_norm)
    opt = factory(ref)
    for ids in token_batches(6, rows=6):
        stats = lw_step(model, lw, ids, 3)
        opt.zero_grad(set_to_none=True)
        for i in range(3):
            (ref(ids[2 * i : 2 * i + 2], ids[2 * i : 2 * i + 2]) / 3).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
        opt.step()
        assert stats.grad_norm == pytest.approx(norm, rel=1e-5)
        assert stats.clip_coef == pytest.approx(max_norm / (norm + 1e-6), rel=1e-5) and stats.clip_coef < 0.5
    assert update_error(model, ref, start) < 1e-5


def _weight_and_state(lw, p) -> tuple[list[torch.Tensor], dict]:
    """Copies of the weight (a QLinear's codes, scales and zeros) and of its optimizer state."""
    layer = qlinear_of(p)
    weights = [p, layer.scales, layer.zeros] if layer is not None else [p]
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in lw.optimizer.state[p].items()}
    return [w.detach().clone() for w in weights], state


@pytest.mark.parametrize("setup", MUON_FAMILY)
def test_muon_family_streaming_nonfinite_gradient_skips_that_weight_only(setup, monkeypatch):
    """Streaming, with accumulation: a NaN in one Muon weight's gradient (G, or the R its layer
    delivers) leaves that weight (QLinear: codes, scales and zeros) and its state (momentum, 8-bit
    codes and scales, projector) bitwise as they were, at a refresh step (k = 3: the low-rank
    weights' refresh finds G non-finite and is undone) and between refreshes (k = 4: the update ran
    before its flag was read, and is put back on the device); the other weights take their update,
    and the next clean step updates the skipped one too."""
    build, factory = STREAMING_SETUPS[setup]
    poison_now = []
    hook = StreamingLayerwiseOptimizer._hook

    def poisoning_hook(self, p):  # the gradient the driver receives, poisoned in place
        grad = p.grad if p.grad is not None else projected_grad(p)
        if poison_now and p is poison_now[0] and grad is not None:  # (a layer's R comes without p.grad)
            grad.view(-1)[0] = math.nan
        hook(self, p)

    monkeypatch.setattr(StreamingLayerwiseOptimizer, "_hook", poisoning_hook)
    model = build()
    lw = layerwise(model, factory, grad_accum_steps=2, streaming=True)
    batches = token_batches(6)
    _steps(model, lw, batches[:3], 2)
    healthy = model.model.layers[1].self_attn.q_proj.weight
    layers = model.model.layers
    for k, bad in ((3, layers[0].mlp.down_proj.weight), (4, layers[1].mlp.up_proj.weight)):
        bad_before, healthy_before = _weight_and_state(lw, bad), _weight_and_state(lw, healthy)
        poison_now.append(bad)
        stats = lw_step(model, lw, batches[k], 2)
        poison_now.clear()
        assert math.isnan(stats.grad_norm) and not stats.skipped and lw.optimizer.nonfinite_steps == k - 2
        (weights, state), (weights_before, state_before) = _weight_and_state(lw, bad), bad_before
        assert all(torch.equal(a, b) for a, b in zip(weights, weights_before, strict=True))
        assert_same_state(state, state_before)
        assert not torch.equal(healthy, healthy_before[0][0]) and lw.optimizer.state[healthy]["step"] == k + 1
    assert not lw_step(model, lw, batches[5], 2).skipped  # and on it goes: the skipped weight steps
    assert lw.optimizer.state[bad]["step"] == 5 and not torch.equal(bad, bad_before[0][0])
    assert lw.optimizer.nonfinite_steps == 2
