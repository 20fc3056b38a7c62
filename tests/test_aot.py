"""The compile stage (``python -m fastgrad.kernels.aot``): Triton kernels compiled for real GPU
targets on this CPU-only machine. It must pass the launchers' real kernels, fail on a kernel that
the interpreter runs but a GPU compiler rejects, and prune a config that does not fit a GPU's
shared memory at launch for that GPU while keeping it where it fits."""

from __future__ import annotations

import functools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastgrad import _backends  # noqa: E402

pytestmark = pytest.mark.skipif(
    _backends.triton_interpret(), reason="compiles for GPU targets; under TRITON_INTERPRET=1 kernels are interpreted"
)

from fastgrad.kernels import _common, aot  # noqa: E402

SM89, SM90 = aot.TARGETS["sm_89"], aot.TARGETS["sm_90"]


@triton.jit
def _dot_mixed_dtypes_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    """fp32 times bf16: the interpreter computes it in fp32; the GPU compiler rejects the dot."""
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One C tile of A (BLOCK_M×K) B (K×BLOCK_N), fp16 in, fp32 out: shared memory grows with the
    tiles and the pipeline stages."""
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(
            tl.load(a_ptr + m[:, None] * K + k[None, :]), tl.load(b_ptr + k[:, None] * BLOCK_N + n[None, :]), acc
        )
    tl.store(c_ptr + m[:, None] * BLOCK_N + n[None, :], acc)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _launch(kernel, args, configs, constexprs=None):
    return _common.launch(kernel, lambda meta: (1,), args, constexprs or {}, configs, torch.device("meta"))


def _broken_workloads():
    mixed = [triton.Config({"BLOCK": 32}, num_warps=4, num_stages=1)]
    args = (_meta(32, 32), _meta(32, 32, dtype=torch.bfloat16), _meta(32, 32))
    yield "dot fp32 x bf16", functools.partial(_launch, _dot_mixed_dtypes_kernel, args, mixed)
    # A 128×128 fp32 accumulator held by one warp: 512 values per thread, more than its 255 registers.
    one_warp = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
    args = (_meta(128, 256, dtype=torch.float16), _meta(256, 128, dtype=torch.float16), _meta(128, 128), 256)
    yield "spills", functools.partial(_launch, _matmul_kernel, args, one_warp)
    huge = [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8, num_stages=4)]
    args = (_meta(256, 1024, dtype=torch.float16), _meta(1024, 256, dtype=torch.float16), _meta(256, 256), 1024)
    yield "shared memory", functools.partial(_launch, _matmul_kernel, args, huge)


def test_broken_kernels_fail_the_stage(monkeypatch):
    rows = aot.compile_target(SM89, calls=_broken_workloads)
    assert [r["ok"] for r in rows] == [False, False, False], rows
    assert "dot fp32 x bf16" in rows[0]["specialization"] and rows[0]["registers"] == ""  # did not compile
    assert rows[1]["kernel"] == "_matmul_kernel" and rows[1]["spilled"] > 0
    assert "no config of _matmul_kernel fits" in rows[2]["config"]
    # and the command's exit status says so
    monkeypatch.setattr(aot, "workloads", _broken_workloads)
    assert aot.main(["--targets", "sm_89", "--jobs", "1"]) == 1


def test_real_launches_compile_and_fit():
    rows = aot.compile_target(SM89, select="quantize_int8 (512, 96) g=32 torch.bfloat16 sym=False sr=True")
    assert rows and all(r["ok"] for r in rows), rows
    row = rows[0]
    assert row["kernel"] == "_quantize_int8_kernel" and 0 < row["registers"] <= 255 and row["spilled"] == 0
    assert "STOCHASTIC=True" in row["specialization"]


def test_config_over_the_shared_memory_of_a_gpu_is_pruned_for_that_gpu_only():
    """128×128×128 fp16 tiles with 3 stages need about 128 KB of shared memory: more than an RTX
    4090's 99 KB per block, less than an H100's 227 KB. The launch takes the next candidate on
    sm_89 only."""
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    ]
    args = (_meta(128, 1024, dtype=torch.float16), _meta(1024, 128, dtype=torch.float16), _meta(128, 128), 1024)
    chosen = {}
    for target in (SM89, SM90):
        with aot.compile_only(target) as log:
            chosen[target.name] = _launch(_matmul_kernel, args, configs)
            tried = dict((str(c), r) for c, r in log[-1]["tried"])
        big = tried[str(configs[0])]
        assert 101376 < big.shared <= 232448, big  # the premise: fits sm_90, not sm_89
    assert chosen == {"sm_89": configs[1], "sm_90": configs[0]}


def test_readme_compile_table_is_the_results_file():
    """The README's compile table is rendered from bench/results/kernels-compile.csv (bench/report.py
    --readme), covers both Triton versions and every target, and records no failure."""
    import csv
    from pathlib import Path

    root = Path(__file__).parent.parent
    with (root / "bench" / "results" / "kernels-compile.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- kernels:begin -->\n", 1)[1].split("\n<!-- kernels:end -->", 1)[0]
    assert block == aot.summary(rows)
    assert {r["target"] for r in rows} == set(aot.TARGETS)
    assert len({r["triton"] for r in rows}) >= 2
    assert all(r["ok"] == "True" for r in rows)
