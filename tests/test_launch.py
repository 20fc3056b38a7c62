"""``kernels._common.launch``: the one launch path of the Triton kernels, with a stand-in kernel
(no GPU needed). It must run the first candidate config that fits the GPU (shared memory within the
per-block limit, no register spills), remember that choice (no second compile, and the same choice
on every rank and run: nothing is timed), guard the launch to the tensors' device, and name the
kernel when nothing fits."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

triton = pytest.importorskip("triton")

from fastgrad.kernels import _common  # noqa: E402

TARGET = _common.Target("test GPU", 89, 128, 101376)


class FakeKernel:
    """Records warmups (compiles) and launches; each config's resources come from ``needs``."""

    def __init__(self, needs: dict[int, tuple[int, int]]):
        self.fn = types.SimpleNamespace(__name__="_fake_kernel")
        self.needs = needs  # BLOCK -> (shared bytes, spilled bytes)
        self.compiled, self.launched = [], []

    def warmup(self, *args, grid, **kwargs):
        block = kwargs["BLOCK"]
        self.compiled.append(block)
        shared, spilled = self.needs[block]
        return types.SimpleNamespace(
            metadata=types.SimpleNamespace(shared=shared), n_regs=64, n_spills=spilled, _init_handles=lambda: None
        )

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((grid, kwargs["BLOCK"], self.current))


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA device: launches are not interpreted, the target is TARGET, and
    ``torch.cuda.device`` records the device a launch is guarded to (FakeKernel.current)."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "_COMPILE_ONLY", None)
    monkeypatch.setattr(_common, "device_target", lambda device: TARGET)
    monkeypatch.setattr(_common, "_CHOSEN", {})
    kernels = []

    @contextlib.contextmanager
    def device(d):
        for k in kernels:
            k.current = d
        yield
        for k in kernels:
            k.current = None

    monkeypatch.setattr(torch.cuda, "device", device)

    def make(needs):
        kernels.append(FakeKernel(needs))
        kernels[-1].current = None
        return kernels[-1]

    return make


def _configs(*blocks):
    return [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in blocks]


def test_first_fitting_config_runs_and_the_choice_is_kept(gpu):
    # 256: too much shared memory for a 99 KB GPU; 128: spills; 64: fits; 32 would fit too.
    kernel = gpu({256: (150_000, 0), 128: (60_000, 24), 64: (40_000, 0), 32: (20_000, 0)})
    dev = torch.device("cuda", 1)
    x = torch.empty(4)
    chosen = _common.launch(
        kernel, lambda meta: (8 // meta["BLOCK"] + 1,), (x, 4), {"FLAG": True}, _configs(256, 128, 64, 32), dev
    )
    assert chosen.kwargs["BLOCK"] == 64
    assert kernel.compiled == [256, 128, 64]  # stops at the first that fits
    assert kernel.launched == [((1,), 64, dev)]  # guarded to the tensors' device, not the current one
    _common.launch(kernel, lambda meta: (1,), (x, 4), {"FLAG": True}, _configs(256, 128, 64, 32), dev)
    assert kernel.compiled == [256, 128, 64], "the choice is cached: no new compile"
    assert [b for _, b, _ in kernel.launched] == [64, 64]


def test_other_specialization_chooses_again(gpu):
    kernel = gpu({128: (60_000, 0), 64: (40_000, 0)})
    x = torch.empty(4)
    _common.launch(kernel, lambda meta: (1,), (x, 4), {"FLAG": True}, _configs(128, 64), torch.device("cuda", 0))
    _common.launch(
        kernel, lambda meta: (1,), (x.double(), 4), {"FLAG": True}, _configs(128, 64), torch.device("cuda", 0)
    )
    _common.launch(kernel, lambda meta: (1,), (x, 4), {"FLAG": False}, _configs(128, 64), torch.device("cuda", 0))
    assert kernel.compiled == [128, 128, 128]  # a dtype and a constexpr are each a new specialization


def test_spilling_config_only_when_nothing_else_fits(gpu):
    kernel = gpu({128: (200_000, 0), 64: (60_000, 16), 32: (30_000, 8)})
    with pytest.warns(UserWarning, match="spills registers on test GPU"):
        chosen = _common.launch(kernel, lambda meta: (1,), (4,), {}, _configs(128, 64, 32), torch.device("cuda"))
    assert chosen.kwargs["BLOCK"] == 64  # the first that fits shared memory


def test_nothing_fits_names_the_kernel(gpu):
    kernel = gpu({128: (200_000, 0), 64: (120_000, 0)})
    with pytest.raises(RuntimeError, match=r"no config of _fake_kernel fits test GPU \(sm_89\)"):
        _common.launch(kernel, lambda meta: (1,), (4,), {}, _configs(128, 64), torch.device("cuda"))
    assert kernel.launched == []
