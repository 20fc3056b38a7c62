"""The launch plans of the Triton kernels that decide their scratch memory, in plain Python.

A launcher (``project.py``, ``quant.py``) asks its plan how to split the work and allocates the
workspace the plan names; the memory model (``fastgrad.train.memory``) asks the same plan what a
launch on a GPU allocates. This module imports neither Triton nor torch, so the estimate works on a
machine without Triton. The GPU values of the knobs are the defaults of the plan classes; the
launchers shrink them under the interpreter so that tests reach every path with small shapes.

``slots`` is ``kernels._common.parallel_slots``: the programs that keep the device busy (4 per SM).
"""

from __future__ import annotations

from dataclasses import dataclass

FP32_BYTES = 4  # the workspaces hold fp32 partial results


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class SplitK:
    """When ``lowrank_matmul`` (C[M, N] = Σ_k A[M, k] B[k, N]) splits K over a second grid axis.

    K is split only when the grid of nominal tiles leaves the device idle, and only as far as the
    fp32 workspace ``(splits, M, N)`` (written and read back once: 2·splits·M·N·4 bytes) stays
    under ``traffic_budget`` of the traffic of the streamed operand (K·max(M, N)·itemsize bytes).
    Each split takes a multiple of ``align`` values of K (a multiple of every config's BLOCK_K)."""

    min_k: int = 512  # fewest values of K per split
    max_splits: int = 32
    traffic_budget: float = 0.25
    nominal_tile: int = 128  # the tile assumed before one is chosen
    align: int = 256

    def plan(self, M: int, N: int, K: int, itemsize: int, slots: int) -> tuple[int, int]:
        """(splits, K values per split)."""
        tiles = cdiv(M, self.nominal_tile) * cdiv(N, self.nominal_tile)
        programs = slots // 2  # about 2 programs of a 128×128 tile fit on an SM
        if tiles >= programs or M * N == 0:
            return 1, K
        budget = self.traffic_budget * K * max(M, N) * itemsize / (8 * M * N)
        splits = int(min(cdiv(programs, tiles), K // self.min_k, self.max_splits, budget))
        if splits <= 1:
            return 1, K
        k_per_split = cdiv(cdiv(K, splits), self.align) * self.align
        return cdiv(K, k_per_split), k_per_split

    def workspace_bytes(
        self, M: int, N: int, K: int, itemsize: int, slots: int, accumulate: bool = False, out_fp32: bool = False
    ) -> int:
        """Peak bytes a matmul allocates besides its output: the split-K workspace, the fp32 sum of
        its partials, and when accumulating into ``out`` its fp32 copy (none if fp32) and the sum."""
        splits, _ = self.plan(M, N, K, itemsize, slots)
        if splits == 1 or K == 0:
            return 0
        plane = M * N * FP32_BYTES
        added = (0 if out_fp32 else plane) + plane if accumulate else 0
        return splits * plane + plane + added


def lowrank_grad_workspace_bytes(
    split_k: SplitK, T: int, m: int, n: int, rank: int, side: str, itemsize: int, slots: int
) -> int:
    """Peak bytes ``lowrank_grad`` allocates besides R (dy T×m, x T×n, both of ``itemsize``): the
    intermediate Z (T×r, or Zᵀ r×T, in dy's dtype) and, while it lives, the larger workspace of
    its two products (right: Z = x Pᵀ with K = n, then R = dyᵀ Z with K = T; left: Zᵀ = Pᵀ dyᵀ with
    K = m, then R = Zᵀ x with K = T)."""
    if side == "right":
        first = split_k.workspace_bytes(T, rank, n, itemsize, slots)
        second = split_k.workspace_bytes(m, rank, T, itemsize, slots)
    else:
        first = split_k.workspace_bytes(rank, T, m, itemsize, slots)
        second = split_k.workspace_bytes(rank, n, T, itemsize, slots)
    return T * rank * itemsize + max(first, second)


@dataclass(frozen=True)
class QuantTiling:
    """How the quantizers tile ``num_groups`` groups of ``group_size`` values (``quant.py``): a
    program owns GROUPS groups × BLOCK values; when too few tiles fill the device each group's
    chunks are split over a second grid axis, with partial min/max in an fp32 workspace."""

    max_block: int = 2048  # most values of one group handled per chunk
    target_tile: int = 4096  # values per program (GROUPS · BLOCK) when groups are small

    def plan(self, num_groups: int, group_size: int, slots: int) -> QuantPlan:
        block = min(next_power_of_2(group_size), self.max_block)
        groups = max(1, min(self.target_tile // block, next_power_of_2(num_groups)))
        num_chunks = cdiv(group_size, block)
        tiles = cdiv(num_groups, groups)
        splits = 1
        if num_chunks > 1 and tiles < slots:
            splits = min(num_chunks, cdiv(slots, tiles))
        chunks_per_split = cdiv(num_chunks, splits)
        splits = cdiv(num_chunks, chunks_per_split)  # no empty split
        return QuantPlan(block, groups, num_chunks, tiles, chunks_per_split, splits)

    def quantize_workspace_bytes(self, num_groups: int, group_size: int, slots: int, symmetric: bool) -> int:
        """Peak bytes a split quantization allocates besides codes, scales and zeros: the partial
        (min, max) per group and split, then the reduced min (asymmetric) and max per group."""
        if num_groups == 0:
            return 0
        splits = self.plan(num_groups, group_size, slots).splits
        if splits == 1:
            return 0
        return 2 * num_groups * splits * FP32_BYTES + (1 if symmetric else 2) * num_groups * FP32_BYTES


@dataclass(frozen=True)
class QuantPlan:
    block: int  # BLOCK: values of a group per chunk
    groups: int  # GROUPS: groups per program
    num_chunks: int
    tiles: int  # programs along the groups
    chunks_per_split: int
    splits: int  # programs along one group's chunks


@dataclass(frozen=True)
class NewtonSchulzPlan:
    """How the Newton–Schulz launcher (``newton_schulz.py``) lays out its buffers and splits the
    norm. The rows of A, B (s×s) and the iterates (s×l) start at multiples of ``row_align`` elements
    (128 bytes of bf16), so that the matmuls' loads are aligned and vectorized whatever m and n are
    (a 5461-wide Y would otherwise cost registers per address and spill the large tiles). The sum of
    squares of an m-row matrix is split into at most ``max_chunks`` chunks of a multiple of
    ``norm_rows`` rows, enough to fill the device."""

    row_align: int = 64
    max_chunks: int = 256  # NC of the normalize kernel
    norm_rows: int = 16  # rows of a norm / normalize tile

    def padded_cols(self, cols: int) -> int:
        return cdiv(cols, self.row_align) * self.row_align

    def norm_chunks(self, m: int, slots: int, batch: int = 1) -> tuple[int, int]:
        """(rows per chunk, chunks) of the sum of squares of each of ``batch`` m-row matrices."""
        n_chunks = max(1, min(self.max_chunks, cdiv(slots, batch), cdiv(m, self.norm_rows)))
        rows_per_chunk = cdiv(cdiv(m, n_chunks), self.norm_rows) * self.norm_rows
        return rows_per_chunk, cdiv(m, rows_per_chunk)  # no empty chunk

    def workspace_bytes(self, m: int, n: int, itemsize: int, slots: int) -> int:
        """Bytes a launch on one m×n matrix allocates besides its output: A and B (s×s), two
        iterates (s×l; one when a wide output's rows are aligned: the output is the other), rows
        padded to ``row_align``, and the fp32 partial sums of the norm."""
        s, big = min(m, n), max(m, n)
        iterates = 1 if m <= n and big % self.row_align == 0 else 2
        partials = FP32_BYTES * self.norm_chunks(m, slots)[1]
        return (2 * s * self.padded_cols(s) + iterates * s * self.padded_cols(big)) * itemsize + partials


def adam_step_workspace_bytes(r_numel: int) -> int:
    """The fused projected-Adam step's scratch: the direction N, fp32, R's shape (every variant)."""
    return r_numel * FP32_BYTES
