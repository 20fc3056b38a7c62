"""Which implementation serves each op, and the fallbacks when compiled code is absent."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgrad import _backends
from fastgrad._ops import SCHEMAS

_PROBE = """
import json, torch, fastgrad
from fastgrad import _backends, ops
torch.manual_seed(0)
x = torch.randn(8, 64)
q = ops.quantize_int4(x, 32, stochastic=True, seed=1)
r = ops.lowrank_project(torch.randn(64, 32), q.dequantize()[:, :32].contiguous(), "right")  # P: 8×32
print(json.dumps({"served": {op: s["cpu"] for op, s in _backends.SERVED_BY.items()},
                  "ext_error": _backends.EXTENSION_ERROR, "codes": q.codes.sum().item(), "r": list(r.shape)}))
"""


def _probe(**env) -> dict:
    """Run _PROBE in a fresh process (backends are chosen at import) without the interpreter."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_extension_falls_back_to_the_reference_everywhere():
    without = _probe(FASTGRAD_NO_EXT="1")
    assert without["ext_error"] == "disabled by FASTGRAD_NO_EXT=1"
    assert set(without["served"].values()) == {"reference"}
    with_ext = _probe()
    # Same codes from the reference and from whatever serves by default: one random stream.
    assert without["codes"] == with_ext["codes"] and without["r"] == with_ext["r"] == [64, 8]


@pytest.mark.skipif(_backends.EXTENSION_ERROR is not None, reason="fastgrad._C is not built")
def test_compiled_kernels_serve_every_op_on_cpu():
    # The fast path must not silently fall back: with the extension built, no CPU op is left on
    # the reference (under TRITON_INTERPRET=1 the Triton bodies take CPU over instead).
    expected = "triton-interpret" if _backends.triton_interpret() else "cpp"
    assert {op: _backends.SERVED_BY[op]["cpu"] for op in SCHEMAS} == {op: expected for op in SCHEMAS}


def test_cuda_backend_choice_is_explicit(monkeypatch):
    # A measured preference (what bench/gpu_acceptance.py writes) for one op; the others have none.
    monkeypatch.setattr(_backends, "CUDA_PREFERENCE", {"quantize_int8": "cuda"})
    monkeypatch.setenv("FASTGRAD_CUDA_BACKEND", "triton")  # the environment overrides the table
    assert _backends._cuda_backend_choice("quantize_int8") == "triton"
    monkeypatch.setenv("FASTGRAD_CUDA_BACKEND", "cuda")
    assert _backends._cuda_backend_choice("dequantize_int8") == "cuda"
    monkeypatch.delenv("FASTGRAD_CUDA_BACKEND")
    assert _backends._cuda_backend_choice("quantize_int8") == "cuda"  # the table
    assert _backends._cuda_backend_choice("dequantize_int8") == "triton"  # no entry: Triton
    if torch.cuda.is_available():
        assert _backends.SERVED_BY["quantize_int8"]["cuda"] in ("triton", "cuda")
