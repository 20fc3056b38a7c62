"""Row-sharded parameters: what the optimizers need to step an FSDP2 (``fully_shard``) parameter
(docs/algorithms.md §11).

``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor sharded by rows
(``Shard(0)`` over a 1-D mesh of the W ranks): rank k holds rows [k·c, min((k+1)·c, m)) with
c = ⌈m/W⌉ (the last ranks may hold fewer rows, or none), and after backward each rank's ``.grad``
is the same slice of the gradient averaged over all ranks. The optimizers step the local rows in
place (``to_local()`` is a view of FSDP's storage) and keep the moments of those rows only. What
is not row-local is written out where it is used, with the collective it costs (per weight m×n,
rank r', ``b`` bytes per gradient element):

* a right-side projection R = G·Pᵀ (P r'×n) is row-local: nothing is sent between refreshes;
* a left-side projection R = Pᵀ·G (P m×r') sums over all rows: each rank projects its rows with
  its rows of P and the r'×n partials are all-reduced (r'·n·b per step); R and its moments are
  then the same on every rank (replicated);
* a refresh gathers G (all-gather, m·n·b) and every rank computes the same subspace from it;
  the subspace is then broadcast from rank 0 (r'·d·b) so that no rank depends on its linear-algebra
  library being bitwise deterministic;
* norms over rows (Fira's and APOLLO's per-channel norms of a right-side R, their limiters, a
  per-tensor scale) all-reduce their sums of squares (one value per channel, or one scalar).

The random and DCT projectors regenerate the same P on every rank from the seed and the global
shape, so they send nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastgrad.ops import QuantizedTensor

__all__ = ["RowShard", "row_shard", "sharded_norm"]


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return None
    return DTensor


def is_dtensor(t: torch.Tensor | None) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local tensor of a DTensor (a view of its storage), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True, eq=False)
class RowShard:
    """The rows ``[offset, offset + rows)`` of a parameter of global ``shape`` that this rank holds;
    the other rows are on the other ranks of ``group``."""

    group: torch.distributed.ProcessGroup
    offset: int
    rows: int
    shape: torch.Size
    mesh: torch.distributed.device_mesh.DeviceMesh

    def rows_of(self, full: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
        """This rank's rows of a tensor whose dim 0 spans the global rows (a view); of a quantized
        one, the rows of its codes, scales and zeros (its groups lie within rows)."""
        if isinstance(full, QuantizedTensor):
            return full.narrow_rows(self.offset, self.rows)
        return full.narrow(0, self.offset, self.rows)

    def as_dtensor(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (this rank's rows of a tensor whose dim 0 is the parameter's) as a DTensor laid
        out as the parameter: the whole contiguous tensor, sharded by rows."""
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size((self.shape[0], *rows.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(rows, self.mesh, [Shard(0)], shape=shape, stride=stride)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole tensor whose rows every rank holds its share of (an all-gather)."""
        return self.as_dtensor(rows).full_tensor()

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the global shape with ``t``'s dtype and device that owns no memory (an
        expanded 0-d tensor): what a projector reads the shape, dtype and device of."""
        return torch.empty((), dtype=t.dtype, device=t.device).expand(self.shape)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place over the ranks that share the parameter."""
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite ``t`` with the first rank's copy."""
        src = torch.distributed.get_global_rank(self.group, 0)
        torch.distributed.broadcast(t, src=src, group=self.group)
        return t


def row_shard(p: torch.Tensor) -> RowShard | None:
    """The :class:`RowShard` of a parameter sharded by rows (FSDP2), None for a plain tensor.
    Other DTensor layouts are refused: the optimizers assume that only dim 0 is distributed."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"fastgrad optimizers step parameters sharded by rows over a 1-D mesh (FSDP2's Shard(0)); "
            f"got placements {placements} over a {mesh.ndim}-D mesh"
        )
    local_shape, global_offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return RowShard(mesh.get_group(), int(global_offset[0]), int(local_shape[0]), p.shape, mesh)


def sharded_norm(
    x: torch.Tensor, dim: int | None, shard: RowShard | None, *, rows_sharded: bool, keepdim: bool = False
) -> torch.Tensor:
    """fp32 2-norm of ``x`` over ``dim`` (None: all of it) as the unsharded tensor would give it.

    ``rows_sharded``: ``x`` holds only this rank's rows of the global tensor (dim 0 distributed),
    so a norm that reduces over dim 0 all-reduces the per-rank sums of squares; a norm along rows
    (dim 1 of a matrix), or of a tensor every rank holds whole, is local."""
    if shard is None or not rows_sharded or dim == 1:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=torch.float32)
    squares = torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=torch.float32).square_()
    return shard.sum_(squares).sqrt_()
