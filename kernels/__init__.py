"""Triton kernels of fastgrad (installed as ``fastgrad.kernels``).

``TRITON_KERNELS`` maps an op name of ``fastgrad/_ops.py`` to its Triton launcher;
``fastgrad/_backends.py`` registers each for ``cuda`` (and ``cpu`` under ``TRITON_INTERPRET=1``).
One file per op family: ``quant.py`` (quantizers, bf16 stochastic rounding), ``project.py``
(low-rank projections and the low-rank weight gradient, dense or with a fused-dequantized
INT4/INT8 projector), ``adam_step.py`` (the fused projected-Adam step of GaLore / Q-GaLore, dense or
INT8 weight), ``newton_schulz.py`` (Muon's Newton–Schulz orthogonalization: the symmetric
products Y Yᵀ and A·A on their upper tiles only, and the update a·Y + B·Y). ``_common.py`` holds
the one launch path (config choice, device guard); ``plans.py`` the launch plans that size the
kernels' workspaces (plain Python: the memory model imports it on machines without Triton, which
is why the kernel modules load only when ``TRITON_KERNELS`` is first read); ``aot.py`` compiles
every launch for GPU targets without a GPU (``python -m fastgrad.kernels.aot``).
"""


def _triton_kernels() -> dict:
    from .adam_step import (
        galore_adam_step_int8_triton,
        galore_adam_step_quantized_triton,
        galore_adam_step_triton,
    )
    from .newton_schulz import newton_schulz_triton
    from .project import (
        lowrank_grad_quantized_triton,
        lowrank_grad_triton,
        lowrank_project_back_add_triton,
        lowrank_project_back_quantized_add_triton,
        lowrank_project_back_quantized_triton,
        lowrank_project_back_triton,
        lowrank_project_quantized_triton,
        lowrank_project_triton,
    )
    from .quant import (
        dequantize_int4_triton,
        dequantize_int8_triton,
        quantize_int4_triton,
        quantize_int8_triton,
        round_bf16_stochastic_triton,
    )

    TRITON_KERNELS = {
        "quantize_int8": quantize_int8_triton,
        "dequantize_int8": dequantize_int8_triton,
        "quantize_int4": quantize_int4_triton,
        "dequantize_int4": dequantize_int4_triton,
        "round_bf16_stochastic": round_bf16_stochastic_triton,
        "lowrank_project": lowrank_project_triton,
        "lowrank_project_back": lowrank_project_back_triton,
        "lowrank_project_quantized": lowrank_project_quantized_triton,
        "lowrank_project_back_quantized": lowrank_project_back_quantized_triton,
        "lowrank_project_back_add_": lowrank_project_back_add_triton,
        "lowrank_project_back_quantized_add_": lowrank_project_back_quantized_add_triton,
        "lowrank_grad": lowrank_grad_triton,
        "lowrank_grad_quantized": lowrank_grad_quantized_triton,
        "galore_adam_step_": galore_adam_step_triton,
        "galore_adam_step_quantized_": galore_adam_step_quantized_triton,
        "galore_adam_step_int8_": galore_adam_step_int8_triton,
        "newton_schulz": newton_schulz_triton,
    }
    return TRITON_KERNELS


def __getattr__(name: str):
    if name == "TRITON_KERNELS":
        return _triton_kernels()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
