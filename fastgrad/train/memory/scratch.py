"""The scratch memory of the kernels a training step calls, from the plans the kernels size it
with: the C++ CPU kernels' (``fastgrad._C.projection_scratch``, ``tn_matmul_scratch``,
``int8_step_scratch``: csrc/cpu/project_common.h), the Triton launchers' on a GPU
(:mod:`fastgrad.kernels.plans`), and the CPU flash-attention kernel's per-thread blocks."""

from __future__ import annotations

from fastgrad.kernels import plans

SPLIT_K = plans.SplitK()  # when a GPU matmul splits K
QUANT_TILING = plans.QuantTiling()  # how the GPU quantizers tile and split groups
# The SM count assumed for the GPU workspaces when no GPU is visible: an RTX 4090's, the 24 GB card
# the defaults target. More SMs split more matmuls (a few MiB of workspace at most).
DEFAULT_SM_COUNT = 128
# Elements of the buffer torch's CPU copy_ transposes a 2-D block through (60×60, any size).
TRANSPOSE_BLOCK = 60 * 60
NS_PLAN = plans.NewtonSchulzPlan()  # the Triton Newton–Schulz launcher's buffers on a GPU


def _cpu_scratch():
    """The scratch plans of the blocked C++ CPU kernels (csrc/cpu/project_common.h), as the kernels
    size their buffers: ``fastgrad._C.projection_scratch`` etc. return (block length, fp32 elements
    of the P block, of the other block)."""
    from fastgrad import _backends

    if _backends.EXTENSION_ERROR is not None:
        raise ValueError(
            "--device cpu: the CPU memory model counts the scratch of fastgrad's C++ kernels, which did not "
            f"load ({_backends.EXTENSION_ERROR}); use --device cuda, or install with the extension"
        )
    from fastgrad import _C

    return _C


class KernelScratch:
    """Bytes of kernel scratch on ``device`` ("cpu" or "cuda") for a model of ``e`` bytes per
    element, on a GPU of ``sm_count`` SMs."""

    def __init__(self, device: str, e: int, sm_count: int) -> None:
        self.device, self.e, self.cast = device, e, e != 4
        self.slots = 4 * sm_count  # kernels._common.parallel_slots of that GPU
        self.cpp = _cpu_scratch() if device == "cpu" else None

    def down(self, red: int, rank: int, other: int, g_f32: bool, p_f32: bool) -> int:
        """The down projection's scratch (R is other×rank, reduced over ``red``). CPU, project_blocked
        (csrc/cpu/project.cpp): blocks of P (decoded or upcast, unless P is dense fp32) and of G
        (upcast, unless fp32); one at::mm when both are fp32. GPU: the Triton matmul decodes P in
        registers; its split-K workspace."""
        if self.device != "cpu":
            return SPLIT_K.workspace_bytes(other, rank, red, 4 if g_f32 else self.e, self.slots)
        if g_f32 and p_f32:
            return 0
        return 4 * sum(self.cpp.projection_scratch(red, rank, other, red * rank, p_f32, g_f32)[1:])

    def up(
        self, split: int, rank: int, other: int, r_numel: int, out_f32: bool, p_f32: bool, accumulate: bool = True
    ) -> int:
        """The up projection's scratch (output split×other, K = rank; ``accumulate``: added into the
        output in place). CPU, project_back_blocked: R upcast to fp32 (16-bit R), blocks of P
        (decoded/upcast) and of the output (16-bit output); one at::addmm when everything is fp32.
        GPU: the Triton matmul's split-K workspace (and the fp32 sum it adds into the output)."""
        r_f32 = not self.cast or r_numel == 0
        if self.device != "cpu":
            itemsize = 4 if r_f32 else self.e
            return SPLIT_K.workspace_bytes(split, other, rank, itemsize, self.slots, accumulate, out_f32)
        if out_f32 and p_f32 and r_f32:
            return 0
        rf = 0 if r_f32 else r_numel * 4
        return rf + 4 * sum(self.cpp.projection_scratch(split, rank, other, split * rank, p_f32, out_f32)[1:])

    def tn_matmul(self, tokens: int, width: int, rank: int, right: bool) -> int:
        """CPU, lowrank_grad's second product: tn_matmul_f32(dy, Z) (right: dy 16-bit, T×width) or
        (Zᵀ, x) (left: x 16-bit, T×width), the 16-bit operand upcast by blocks of T rows."""
        if right:
            return 4 * sum(self.cpp.tn_matmul_scratch(tokens, width, rank, False, True)[1:])
        return 4 * sum(self.cpp.tn_matmul_scratch(tokens, rank, width, True, False)[1:])

    def lowrank_grad(self, tokens: int, m: int, n: int, rank: int, side: str, itemsize: int) -> int:
        """GPU: the Triton lowrank_grad's Z (T×r, dy's dtype) and its products' split-K workspaces."""
        return plans.lowrank_grad_workspace_bytes(SPLIT_K, tokens, m, n, rank, side, itemsize, self.slots)

    def int8_step(self, m: int, n: int, rank: int, left: bool) -> tuple[int, int]:
        """CPU, the fused INT8-weight step: (decoded rows of W, block of the decoded INT4 P) in bytes."""
        _, p_block, rows_block = self.cpp.int8_step_scratch(m, n, rank, left, rank * n)
        return 4 * rows_block, 4 * p_block

    @staticmethod
    def adam_step(r_numel: int) -> int:
        """The fused projected-Adam step's N (every device)."""
        return plans.adam_step_workspace_bytes(r_numel)

    def quantize(self, num_groups: int, group_size: int, symmetric: bool) -> int:
        """GPU: the Triton quantizer's partial statistics when it splits groups (CPU: none)."""
        if self.device == "cpu":
            return 0
        return QUANT_TILING.quantize_workspace_bytes(num_groups, group_size, self.slots, symmetric)

    def newton_schulz(self, m: int, n: int, itemsize: int) -> int:
        """The Newton–Schulz op's buffers besides its output, for an m×n matrix of ``itemsize``-byte
        elements (s = min(m, n), l = max(m, n)). CPU (csrc/cpu/newton_schulz.cpp): A and B (s×s) and
        the two iterates (s×l) allocated once per call, the normalised X (s×l) until the first step
        replaces it, with its 0-d norm; for a tall matrix (worked on as Xᵀ) the first step's addmm
        copies the column-major X with copy_'s 60×60 transpose block (a matrix of at least that many
        elements: copy_transpose_valid; a smaller one, e.g. GaLoreMuon's r'-wide U, is copied
        without). GPU: the Triton launcher's plan (:class:`fastgrad.kernels.plans.NewtonSchulzPlan`)."""
        if self.device == "cpu":
            s, big = min(m, n), max(m, n)
            transpose_block = TRANSPOSE_BLOCK if m > n and m * n >= TRANSPOSE_BLOCK else 0
            return itemsize * (2 * s * s + 3 * s * big + 1 + transpose_block)
        return NS_PLAN.workspace_bytes(m, n, itemsize, self.slots)

    def flash(self, seq_len: int, head_dim: int, backward: bool) -> int:
        """The CPU flash-attention kernel's per-thread fp32 buffer (one thread counted), blocks of qS
        queries × kvS keys (qS = 32, 64 from 192 tokens, 256 from 768; kvS = 512; at most seq):
        forward the scores, row max and sum, and the output block; backward the scores and their
        gradient, and a row sum. 16-bit models add 16-bit copies of the score blocks."""
        if self.device != "cpu":
            return 0
        t, d = seq_len, head_dim
        qs = min(t, 256 if t >= 768 else 64 if t >= 192 else 32)
        kvs = min(t, 512)
        if backward:
            return 4 * (2 * qs * kvs + qs) + (2 * 2 * qs * kvs if self.cast else 0)
        return 4 * (qs * kvs + 2 * qs + qs * d) + (2 * qs * kvs if self.cast else 0)
