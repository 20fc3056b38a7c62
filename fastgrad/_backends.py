"""Loads the compiled backends and records which implementation serves each op on each device.

Order of precedence on a device (later registrations override earlier ones in the dispatcher):
  reference (``default`` kernel of ``_ops.py``, every device)
  < C++ (``fastgrad._C``: CPU always, CUDA when built with a CUDA torch)
  < Triton (``fastgrad.kernels``: ``cuda``; ``cpu`` too when ``TRITON_INTERPRET=1``, so the
    Triton bodies are exercised on CPU-only machines).
On CUDA, ops that have both a CUDA C++ and a Triton kernel go to the one in ``CUDA_PREFERENCE``
(set from GPU benchmark results), overridable with ``FASTGRAD_CUDA_BACKEND=triton|cuda``.
"""

from __future__ import annotations

import os
import warnings

import torch

from fastgrad._ops import LIB, SCHEMAS

# op -> device ("cpu" | "cuda") -> implementation name
SERVED_BY: dict[str, dict[str, str]] = {op: {"cpu": "reference", "cuda": "reference"} for op in SCHEMAS}
EXTENSION_ERROR: str | None = None  # why fastgrad._C did not load, if it did not
TRITON_ERROR: str | None = None  # why the Triton kernels were not registered, if they were not

# Which of two CUDA implementations serves an op when both exist. Triton until a GPU benchmark in
# bench/results/ shows the CUDA C++ kernel faster on the target device.
CUDA_PREFERENCE: dict[str, str] = {}


def extension_disabled() -> bool:
    return os.environ.get("FASTGRAD_NO_EXT", "0") not in ("", "0")


def triton_interpret() -> bool:
    """TRITON_INTERPRET as Triton reads it (``triton.knobs.runtime.interpret``), without importing Triton."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")


def _load_extension() -> None:
    global EXTENSION_ERROR
    if extension_disabled():
        EXTENSION_ERROR = "disabled by FASTGRAD_NO_EXT=1"
        return
    try:
        from fastgrad import _C  # noqa: F401  (registers TORCH_LIBRARY_IMPL kernels on import)
    except ImportError as e:
        EXTENSION_ERROR = f"{type(e).__name__}: {e}"
        return
    for op in SCHEMAS:
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIB}::{op}", key):
                SERVED_BY[op][device] = "cpp" if device == "cpu" else "cuda"


def _cuda_backend_choice(op: str) -> str:
    forced = os.environ.get("FASTGRAD_CUDA_BACKEND", "")
    if forced in ("triton", "cuda"):
        return forced
    return CUDA_PREFERENCE.get(op, "triton")


def _register_triton() -> None:
    global TRITON_ERROR
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if triton_interpret():
        devices.append("cpu")
    if not devices:
        TRITON_ERROR = "no CUDA device and TRITON_INTERPRET is not set"
        return
    try:
        from fastgrad.kernels import TRITON_KERNELS
    except ImportError as e:
        TRITON_ERROR = f"{type(e).__name__}: {e}"
        return
    for op, launcher in TRITON_KERNELS.items():
        for device in devices:
            if device == "cuda" and SERVED_BY[op]["cuda"] == "cuda" and _cuda_backend_choice(op) == "cuda":
                continue
            with warnings.catch_warnings():
                # Replacing the C++ CPU kernel under TRITON_INTERPRET=1 is the point; silence the notice.
                warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
                torch.library.register_kernel(f"{LIB}::{op}", device, launcher)
            SERVED_BY[op][device] = "triton-interpret" if device == "cpu" else "triton"


def load() -> None:
    """Called once from ``fastgrad/__init__.py``."""
    _load_extension()
    _register_triton()
