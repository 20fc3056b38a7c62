"""Triton kernels of fastgrad (installed as ``fastgrad.kernels``).

``TRITON_KERNELS`` maps an op name of ``fastgrad/_ops.py`` to its Triton launcher;
``fastgrad/_backends.py`` registers each for ``cuda`` (and ``cpu`` under ``TRITON_INTERPRET=1``).
"""

TRITON_KERNELS: dict = {}
