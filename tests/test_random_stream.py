"""The installed Triton's ``tl.randint`` gives the random stream of the contract (README, "Random
stream"): Philox4x32-10 keyed by the 64-bit seed, counter offset + i split into its low and high
words, output word 0, exactly ``_reference.philox_uint32``. Every stochastic-rounding kernel of
``kernels/`` draws through it, so a Triton release that changes the layout (older releases used
other arithmetic for 64-bit counters) would change the codes on the GPU while every other backend
keeps the reference's. CI runs this under the interpreter with each Triton it supports (the one
installed for the tests and the one of the GPU machines, see .ci/run); on a GPU it runs compiled.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastgrad import _backends  # noqa: E402
from fastgrad import _reference as ref  # noqa: E402

_INTERPRET = _backends.triton_interpret()
DEVICES = (["cpu"] if _INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not DEVICES, reason="needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU"),
]


@triton.jit(do_not_specialize=["seed", "offset"])
def _randint_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + idx, tl.randint(seed, offset + idx).to(tl.int64), mask=idx < n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "seed, offset",
    [
        (0, 0),
        (2**63 - 1, 0),  # key high word set
        (7, 2**32 - 40),  # counters cross 2**32 inside the block: the high word carries
        (2**32 + 5, 2**62 + 3),  # both high words set
    ],
)
def test_randint_is_the_reference_stream(seed, offset, device):
    n = 300
    out = torch.empty(n, dtype=torch.int64, device=device)
    _randint_kernel[(triton.cdiv(n, 128),)](out, n, seed, offset, BLOCK=128)
    counters = torch.arange(n, dtype=torch.int64) + offset
    want = ref.philox_uint32(seed, counters)
    got = out.cpu() & 0xFFFFFFFF  # the uint32 word, whatever the sign extension of the cast
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[0].item()}"
