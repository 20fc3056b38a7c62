"""The installed Triton's ``tl.randint4x`` gives the Philox blocks of the contract (README, "Random
stream"): Philox4x32-10 keyed by the 64-bit seed, the counter split into its low and high words,
words 0..3 in order, exactly ``_reference.philox_block``; and ``kernels/quant.py::stream_words``
turns them into the words of stream positions (word p % 4 of block p // 4) on both of its paths.
Every stochastic-rounding kernel of ``kernels/`` draws through them, so a Triton release that
changes the layout (older releases used other arithmetic for 64-bit counters) would change the
codes on the GPU while every other backend keeps the reference's. CI runs this under the
interpreter with each Triton it supports (the one installed for the tests and the one of the GPU
machines, see .ci/run); on a GPU it runs compiled.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from fastgrad.kernels.quant import stream_words  # noqa: E402

from fastgrad import _backends  # noqa: E402
from fastgrad import _reference as ref  # noqa: E402

_INTERPRET = _backends.triton_interpret()
DEVICES = (["cpu"] if _INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not DEVICES, reason="needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU"),
]


@triton.jit(do_not_specialize=["seed", "counter0"])
def _randint4x_kernel(out_ptr, n, seed, counter0, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(seed, counter0 + idx)
    mask = idx < n
    for w, word in enumerate((w0, w1, w2, w3)):
        tl.store(out_ptr + 4 * idx + w, word.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _stream_words_kernel(out_ptr, n, seed, offset, BLOCK_WORDS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) tile of positions offset + i, row-major, as the quantizers' tiles are."""
    i = tl.program_id(0).to(tl.int64) * ROWS * COLS + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    tl.store(out_ptr + i, stream_words(seed, offset + i, BLOCK_WORDS).to(tl.int64), mask=i < n)


SEED_OFFSETS = [
    (0, 0),
    (2**63 - 1, 0),  # key high word set
    (7, 2**34 - 160),  # counters (positions // 4) cross 2**32 inside the block: the high word carries
    (2**32 + 5, 2**62 + 4),  # both high words set
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, offset", SEED_OFFSETS)
def test_randint4x_is_the_reference_block(seed, offset, device):
    n, counter0 = 300, offset // 4
    out = torch.empty(4 * n, dtype=torch.int64, device=device)
    _randint4x_kernel[(triton.cdiv(n, 128),)](out, n, seed, counter0, BLOCK=128)
    want = ref.philox_block(seed, torch.arange(n, dtype=torch.int64) + counter0).reshape(-1)
    got = out.cpu() & 0xFFFFFFFF  # the uint32 word, whatever the sign extension of the cast
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[0].item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "seed, offset, block_words",
    # BLOCK_WORDS needs runs that start at multiples of 4 (block_words_aligned); the per-word path any offset.
    [(s, o, True) for s, o in SEED_OFFSETS] + [(s, o, False) for s, o in SEED_OFFSETS + [(3, 1), (3, 2**34 - 163)]],
)
def test_stream_words_are_the_reference_stream(seed, offset, block_words, device):
    n = 300
    out = torch.empty(n, dtype=torch.int64, device=device)
    _stream_words_kernel[(triton.cdiv(n, 64),)](out, n, seed, offset, BLOCK_WORDS=block_words, ROWS=4, COLS=16)
    want = ref.philox_uint32(seed, torch.arange(n, dtype=torch.int64) + offset)
    got = out.cpu() & 0xFFFFFFFF
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[0].item()}"
