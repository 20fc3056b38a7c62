"""``python -m fastgrad.env``: versions, devices, extension status and the backend of every op.

The first thing to paste into a bug report.
"""

from __future__ import annotations

import platform

import torch

import fastgrad
from fastgrad import _backends


def report() -> str:
    lines = [
        f"fastgrad        {fastgrad.__version__}",
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton          {triton.__version__}")
    except ImportError:
        lines.append("triton          not installed")
    lines.append(f"cpu threads     {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}          {torch.cuda.get_device_name(i)}")
    else:
        lines.append("cuda            no device")
    ext = "loaded" if _backends.EXTENSION_ERROR is None else f"not loaded ({_backends.EXTENSION_ERROR})"
    lines.append(f"fastgrad._C     {ext}")
    if _backends.TRITON_ERROR is not None:
        lines.append(f"triton kernels  not registered ({_backends.TRITON_ERROR})")
    lines.append("")
    width = max(len(op) for op in _backends.SERVED_BY)
    lines.append(f"{'op':<{width}}  {'cpu':<17} cuda")
    for op, served in _backends.SERVED_BY.items():
        cuda = served["cuda"] if torch.cuda.is_available() else f"({served['cuda']}; no device)"
        lines.append(f"{op:<{width}}  {served['cpu']:<17} {cuda}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
