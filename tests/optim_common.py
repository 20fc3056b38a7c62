"""Helpers shared by the optimizer test modules: the tiny LLaMA they train, random token batches,
and a dispatcher-level op counter that proves a step ran through fastgrad's ops."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrad.models import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4)
N_LOWRANK = 14  # 2 layers × (q, k, v, o, gate, up, down): tall (160×64) and wide (64×160) weights


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


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


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
