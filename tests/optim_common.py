"""Helpers shared by the optimizer test modules: the tiny LLaMA they train (float or with INT8
QLinear weights), random token batches, a dispatcher-level op counter that proves a step ran through
fastgrad's ops, a checkpoint round trip, and one factory per optimizer with the settings its tests
use (the per-optimizer modules and the shared behaviour tests of test_optim_common build the same
optimizers)."""

import io
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrad import optim
from fastgrad.models import LlamaConfig, LlamaForCausalLM
from fastgrad.nn import quantize_model

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4)
N_LOWRANK = 14  # 2 layers × (q, k, v, o, gate, up, down): tall (160×64) and wide (64×160) weights
QGROUP = 32  # INT8 weight group size of the quantized tiny model
# With rank 16 the projected moments of the tiny LLaMA have 1024 (q, k, v, o: 64×16) or 2560
# (gate, up: 160×16; down: 16×160) elements: min_8bit_size=1024 puts all 14 in 8 bits, the
# default 4096 none. The embedding and the head (256×64) have 16384 elements.
SMALL_8BIT = 1024


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def quantized_model(seed: int = 0) -> LlamaForCausalLM:
    """The tiny LLaMA with its 14 projection weights as INT8 QLinear (groups of 32)."""
    return quantize_model(tiny_model(seed), group_size=QGROUP)


def token_batches(n: int, rows: int = 4, length: int = 33, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG["vocab_size"], (rows, length), generator=gen) for _ in range(n)]


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, by name (e.g. 'fastgrad.lowrank_project')."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def step_op_counts(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> list[Counter]:
    """One optimizer step per batch (the batch is its own target); the ops each ``opt.step()`` sent
    to the dispatcher, by name (the forward and backward are not counted)."""
    counts = []
    for ids in batches:
        opt.zero_grad()
        model(ids, ids).backward()
        with OpCounter() as counter:
            opt.step()
        counts.append(counter.calls)
    return counts


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> list[float]:
    """One optimizer step per batch (the batch is its own target); returns the losses."""
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_tensors(opt: torch.optim.Optimizer) -> dict:
    """A detached copy of every parameter's optimizer state, keyed by id(param)."""
    return {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for p, st in opt.state.items()
    }


def adam_bytes(opt: torch.optim.Optimizer, model: torch.nn.Module, lowrank_extra) -> int:
    """The state bytes of an optimizer with Adam moments in the parameters' dtype: 2·numel·b per
    parameter, except a low-rank weight of the first group (rank r = min(rank, d), d = min(m, n)):
    2·max(m, n)·r·b of projected moments plus ``lowrank_extra(p, r, d, b)`` (projector, limiter)."""
    rank = opt.param_groups[0]["rank"]
    lowrank = {id(p) for p in opt.param_groups[0]["params"]}
    total = 0
    for p in model.parameters():
        b = p.element_size()
        if id(p) in lowrank:
            d = min(p.shape)
            r = min(rank, d)
            total += 2 * max(p.shape) * r * b + lowrank_extra(p, r, d, b)
        else:
            total += 2 * p.numel() * b
    return total


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def roundtrip(obj):
    """``obj`` through torch.save and torch.load(weights_only=True), as a checkpoint file takes it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------------
# one factory per optimizer
# ------------------------------------------------------------------------------------------------


def make_galore(model, rank=16, gap=20, scale=0.25, *, lr=3e-3, weight_decay=0.1, opt_kwargs=None, **group_kwargs):
    groups = optim.galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=scale, **group_kwargs)
    return optim.GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))


def make_galore8(model, *, rank=16, gap=20, lr=3e-3, weight_decay=0.1, group_kwargs=None, **opt_kwargs):
    groups = optim.galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=0.25, **(group_kwargs or {}))
    opt_kwargs = {"min_8bit_size": SMALL_8BIT, **opt_kwargs}
    return optim.GaLoreAdamW8bit(groups, lr=lr, weight_decay=weight_decay, **opt_kwargs)


def make_adamw8bit(model, **opt_kwargs):
    return optim.AdamW8bit(model.parameters(), **{"lr": 3e-3, "min_8bit_size": SMALL_8BIT, **opt_kwargs})


def make_fira(model, rank=16, gap=20, scale=0.25, *, lr=3e-3, weight_decay=0.1, **opt_kwargs):
    groups = optim.galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=scale)
    return optim.FiraAdamW(groups, lr=lr, weight_decay=weight_decay, **opt_kwargs)


def make_apollo(model, rank=16, gap=20, *, cls=None, lr=3e-3, weight_decay=0.1, opt_kwargs=None, **group_kwargs):
    """An Apollo (or ``cls``, e.g. ApolloMini) optimizer."""
    cls = cls or optim.Apollo
    groups = optim.apollo_param_groups(model, rank=rank, update_proj_gap=gap, **group_kwargs)
    return cls(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))


# one factory per Fira/APOLLO flavour, ``(model, gap=20, lr=3e-3, weight_decay=0.1, **opt_kwargs)``
FIRA_APOLLO = {
    "fira": lambda model, gap=20, **kw: make_fira(model, gap=gap, **kw),
    "fira-paper": lambda model, gap=20, **kw: make_fira(model, gap=gap, variant="paper", **kw),
    "apollo": lambda model, gap=20, lr=3e-3, weight_decay=0.1, **kw: make_apollo(
        model, gap=gap, lr=lr, weight_decay=weight_decay, opt_kwargs=kw
    ),
    "apollo-svd": lambda model, gap=20, lr=3e-3, weight_decay=0.1, **kw: make_apollo(
        model, gap=gap, proj="svd", lr=lr, weight_decay=weight_decay, opt_kwargs=kw
    ),
    "apollo-mini": lambda model, gap=20, lr=3e-3, weight_decay=0.1, **kw: make_apollo(
        model, rank=1, gap=gap, cls=optim.ApolloMini, lr=lr, weight_decay=weight_decay, opt_kwargs=kw
    ),
}


def make_qgalore(model, rank=16, gap=3, *, lr=3e-3, opt_kwargs=None, **group_kwargs):
    groups = optim.qgalore_param_groups(model, rank=rank, update_proj_gap=gap, scale=0.25, **group_kwargs)
    return optim.QGaLoreAdamW(groups, lr=lr, **(opt_kwargs or {}))


def make_qgalore8(model, min_8bit_size=SMALL_8BIT, **opt_kwargs):
    groups = optim.qgalore_param_groups(model, rank=16, update_proj_gap=3, scale=0.25)
    return optim.QGaLoreAdamW8bit(groups, lr=3e-3, min_8bit_size=min_8bit_size, **opt_kwargs)


def make_frugal(model, gap=2, *, lr=3e-3, weight_decay=0.1, opt_kwargs=None, **group_kwargs):
    groups = optim.galore_param_groups(model, rank=None, update_proj_gap=gap, density=0.25, **group_kwargs)
    return optim.Frugal(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))


def block_groups(model, **kw):
    """FrugalBlock's groups: the 14 projection weights (density 0.25 unless given) and the rest."""
    lowrank, rest = optim.galore_param_groups(model, rank=1)
    del lowrank["rank"], lowrank["update_proj_gap"], lowrank["scale"]
    return [{**lowrank, "density": kw.pop("density", 0.25), **kw}, rest]


def make_frugal_block(model, *, lr=1e-2, opt_kwargs=None, **group_kwargs):
    return optim.FrugalBlock(block_groups(model, **group_kwargs), lr=lr, **(opt_kwargs or {}))


def make_muon(model, *, lr=2e-2, adamw_lr=3e-3, weight_decay=0.1, opt_kwargs=None):
    """Muon on the attention/MLP weights, AdamW at ``adamw_lr`` on the rest."""
    groups = optim.muon_param_groups(model, lr=adamw_lr)
    return optim.Muon(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))


def make_galore_muon(model, *, rank=16, gap=3, lr=2e-2, adamw_lr=3e-3, weight_decay=0.1, opt_kwargs=None):
    """GaLoreMuon on the attention/MLP weights (rank ``rank``, a refresh every ``gap`` steps), AdamW
    at ``adamw_lr`` on the rest."""
    groups = optim.galore_muon_param_groups(model, rank=rank, update_proj_gap=gap, adamw_options={"lr": adamw_lr})
    return optim.GaLoreMuon(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))


def make_qgalore_muon(
    model, *, rank=16, gap=3, lr=2e-2, adamw_lr=3e-3, weight_decay=0.1, opt_kwargs=None, **group_kwargs
):
    """QGaLoreMuon on the QLinear weights of a quantized model, AdamW at ``adamw_lr`` on the rest."""
    groups = optim.qgalore_muon_param_groups(
        model, rank=rank, update_proj_gap=gap, adamw_options={"lr": adamw_lr}, **group_kwargs
    )
    return optim.QGaLoreMuon(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))


def make_muon8(model, *, lr=2e-2, adamw_lr=3e-3, weight_decay=0.1, opt_kwargs=None):
    """Muon8bit as :func:`make_muon`: every Muon weight (≥ 4096 elements) keeps an 8-bit momentum,
    the embedding and the head (AdamW) 8-bit moments, the norms fp32 moments."""
    groups = optim.muon_param_groups(model, lr=adamw_lr)
    return optim.Muon8bit(groups, lr=lr, weight_decay=weight_decay, **(opt_kwargs or {}))
