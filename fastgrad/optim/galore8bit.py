"""GaLoreAdamW and AdamW with 8-bit blockwise moments kept with fastgrad's own quantize ops
(docs/algorithms.md §2.5; not bitsandbytes, which needs CUDA and its own codebook).

The representation of the moments (M, V) of a tensor of n elements, read as a flat vector cut into
blocks of ``block_size`` consecutive elements (the last block zero-padded), is

    V:  y = V^(1/4),           asymmetric per block: y ≈ zero + code·scale, zero = min of the block
    M:  r = M / √V̂  ∈ [−C, C],  symmetric per block:  r ≈ (code − 128)·scale,  √V̂ = ŷ² (decoded V)

with uint8 codes from :func:`fastgrad.ops.quantize_int8` (stochastic rounding) and fp32 scales (and
zeros for V; M's zero is −128·scale and is not stored). Decoding: √V̂ = ŷ², V̂ = ŷ⁴, M̂ = r̂·√V̂.
C = (1−β1)/√((1−β2)(1−β1²/β2)) (7.27 for β = (0.9, 0.999)) is the Cauchy–Schwarz bound of Adam's
moments, |M| ≤ C·√V for any gradient sequence started from zero; it requires β1² < β2.

Row-sharded (FSDP2) parameters. The blocks and the rounding stream are those of the *whole* moment
tensor (the R of the whole weight), so W processes store the codes one process stores:

* whether a moment is 8-bit is decided on its global number of elements;
* a moment that holds only this rank's rows (a full-rank or right-side weight; rank k holds rows
  [k·c, min((k+1)·c, m)), c = ⌈m/W⌉) is the global flat range [offset·cols, (offset+rows)·cols).
  Its blocks are the global tensor's when every rank's start k·c·cols is a multiple of
  ``block_size`` (i.e. ``block_size`` divides c·cols); otherwise the first step raises ValueError
  before anything changes. The last rank's tail is zero-padded as the global tensor's tail;
* element i of the global flat tensor draws its V rounding at stream position offset_t + i and its
  M rounding at offset_t + n_pad + i (n_pad: the global padded size), on every rank;
* a left-side moment (r'×n, the same on every rank) is encoded whole, as one process does.

The state of such a row-sharded moment is stored by rows (dim 0 = the parameter's rows), so that a
sharded checkpoint lays it out as the parameter and reshards it to any number of processes: the
codes with the moment's local shape (rows, cols…) (the tail padding is not stored: it decodes to 0),
and each scale and zero as a (rows, t) table holding, for every row, the scales of the t blocks it
touches (t = blocks one row can touch: cols/block_size if block_size divides cols, 1 if cols
divides block_size; a block that spans several rows has its scale repeated in each).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fastgrad.nn.lowrank import projected_grad
from fastgrad.ops import QuantizedTensor, dequantize_int8, quantize_int8
from fastgrad.optim.base import ParamStep, adam_scalars, proj_like, transfer_moments
from fastgrad.optim.galore import GaLoreAdamW
from fastgrad.optim.projectors import LEFT, Projector, effective_rank, lowrank_shape, mix_seed, resolve_side
from fastgrad.optim.sharding import RowShard, row_shard

__all__ = [
    "EightBitMoments", "GaLoreAdamW8bit", "AdamW8bit", "Layout", "moment_bound", "encode_moments", "decode_moments",
]  # fmt: skip

_SR_SALT = 0x3842_4954_4D4F  # separates the moments' rounding stream from the projector's seed
_TINY = torch.finfo(torch.float32).tiny
BLOCK_SIZE = 256  # default values per quantization block of a moment
MIN_8BIT_SIZE = 4096  # default: moments of fewer elements stay fp32

# State keys of the 8-bit layout (a tensor below min_8bit_size keeps fp32 "exp_avg"/"exp_avg_sq").
M_CODES, M_SCALES = "exp_avg_codes", "exp_avg_scales"
V_CODES, V_SCALES, V_ZEROS = "exp_avg_sq_codes", "exp_avg_sq_scales", "exp_avg_sq_zeros"
QSEED = "exp_avg_qseed"
EIGHT_BIT_KEYS = (M_CODES, M_SCALES, V_CODES, V_SCALES, V_ZEROS)
PER_BLOCK_KEYS = (M_SCALES, V_SCALES, V_ZEROS)


@dataclass(frozen=True)
class Layout:
    """The state keys of one 8-bit representation of a tensor of n elements: ``codes``, uint8 with
    one code per element; ``per_block``, fp32 with one value per block; ``dense``, the key of the
    float state a tensor below ``min_8bit_size`` keeps instead. A state holding ``codes[0]`` is 8-bit."""

    dense: str
    codes: tuple[str, ...]
    per_block: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.codes, *self.per_block)


ADAM_LAYOUT = Layout("exp_avg", (M_CODES, V_CODES), PER_BLOCK_KEYS)


def moment_bound(betas: tuple[float, float]) -> float:
    """C with |M_t| ≤ C·√V_t for Adam's moments from zero, any gradients: by Cauchy–Schwarz on
    M_t = Σ(1−β1)β1^(t−i)·g_i against V_t = Σ(1−β2)β2^(t−i)·g_i², C² = (1−β1)²/((1−β2)(1−β1²/β2)).
    The recurrence keeps the bound: |β1·M + (1−β1)·g| ≤ C·√(β2·V + (1−β2)·g²) whenever |M| ≤ C·√V.
    ``inf`` when β1² ≥ β2 (no bound)."""
    beta1, beta2 = betas
    if beta1 == 0.0:
        return 1.0 / math.sqrt(1.0 - beta2)
    if beta1 * beta1 >= beta2:
        return math.inf
    return (1.0 - beta1) / math.sqrt((1.0 - beta2) * (1.0 - beta1 * beta1 / beta2))


def encode_moments(
    first: torch.Tensor,
    second: torch.Tensor,
    block_size: int,
    bound: float,
    seed: int,
    offset: int,
    *,
    start: int = 0,
    total: int | None = None,
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """Adam moments (M, V), fp32, contiguous, numel a multiple of ``block_size`` (both overwritten)
    -> (M codes, V codes): y = V^(1/4) asymmetric per block, then r = M/ŷ² clamped to ±``bound``
    symmetric per block; stochastic rounding with Philox stream positions [offset, offset + 2·total).

    The tensors are the flat elements [start, start + numel) of a moment of ``total`` (padded)
    elements, ``total`` defaulting to their own numel (``start`` 0: the whole moment): element i
    rounds V at position offset + start + i and M at offset + total + start + i, so a slice (a
    rank's rows) draws exactly the numbers the whole tensor's elements draw."""
    n = first.numel()
    total = n if total is None else total
    if start < 0 or start + n > total:
        raise ValueError(f"encode_moments: elements [{start}, {start + n}) are not within a moment of {total}")
    y = second.sqrt_().sqrt_()
    qv = quantize_int8(y, block_size, stochastic=True, seed=seed, offset=offset + start)
    sqrt_v = dequantize_int8(qv.codes, qv.scales, qv.zeros).square_()
    ratio = first.div_(sqrt_v.clamp_min_(_TINY)).clamp_(-bound, bound)
    qm = quantize_int8(ratio, block_size, symmetric=True, stochastic=True, seed=seed, offset=offset + total + start)
    return qm, qv


def decode_moments(
    m_codes: torch.Tensor, m_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor, v_zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_moments`: fp32 (M̂, V̂) = (r̂·ŷ², ŷ⁴); M's zero is −128·scale."""
    sqrt_v = dequantize_int8(v_codes, v_scales, v_zeros).square_()
    first = dequantize_int8(m_codes, m_scales, m_scales * -128.0).mul_(sqrt_v)
    return first, sqrt_v.square_()


class EightBitMoments:
    """Mixin for a :class:`~fastgrad.optim.base.LowRankOptimizer` whose update runs
    ``_step_items(group, items)`` → per weight ``_weight_step(group, item, M, V)`` (GaLoreAdamW,
    QGaLoreAdamW): the Adam moments of every tensor of at least ``min_8bit_size`` elements are kept
    in 8 bits (the representation of the module docstring and :class:`GaLoreAdamW8bit`), decoded
    to fp32 for one weight's step at a time and re-encoded right after it; a low-rank INT8 weight
    (Q-GaLore's) takes the fused ``_fused_step`` on the decoded moments.

    Its constructor is the optimizer's with two more keyword arguments, ``block_size`` and
    ``min_8bit_size`` (the signature a subclass shows, e.g. in ``help()``, is that union)."""

    keep_dtype_keys = (M_SCALES, V_SCALES, V_ZEROS)

    def __init__(
        self, params: Iterable, *args: Any, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE, **kw: Any
    ) -> None:
        self._init_8bit(block_size, min_8bit_size)  # before the parameters are added
        super().__init__(params, *args, **kw)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__signature__ = None  # its own constructor's (not an inherited composed one)
            return
        # The signature of the float optimizer's constructor plus the 8-bit arguments, for help()
        # and editors (the constructor itself forwards everything else to it).
        parent = next(k for k in cls.__mro__[1:] if k is not EightBitMoments and "__init__" in k.__dict__)
        sig = inspect.signature(parent.__init__)
        mine = inspect.signature(EightBitMoments.__init__).parameters
        params = list(sig.parameters.values())
        if "block_size" not in sig.parameters:
            cut = next(i for i, q in enumerate(params) if q.kind is inspect.Parameter.KEYWORD_ONLY)
            params[cut:cut] = [mine["block_size"], mine["min_8bit_size"]]
        cls.__signature__ = sig.replace(parameters=params[1:])  # without self

    def _init_8bit(self, block_size: int, min_8bit_size: int) -> None:
        name = type(self).__name__
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
        if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
            raise ValueError(f"{name}: min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self._layout(group) is not ADAM_LAYOUT:  # the bound is that of Adam's moments only
            return
        betas = group["betas"]
        if not moment_bound(betas) < math.inf:
            raise ValueError(
                f"{type(self).__name__}: betas must satisfy beta1² < beta2 for 8-bit moments (the bound "
                f"|M| ≤ C·√V their encoding relies on), got betas={tuple(betas)}"
            )

    # ------------------------------------------------------------------ layout
    def _layout(self, group: dict[str, Any]) -> Layout:
        """The 8-bit representation of ``group``'s state (Adam's moments; a subclass with other
        state, e.g. Muon8bit's momentum, returns its own for those groups)."""
        return ADAM_LAYOUT

    def _rounding_seed(self, group: dict[str, Any], it: ParamStep) -> int:
        """The Philox key of ``it``'s stochastic rounding (its parameter's seed, salted)."""
        return mix_seed(self._param_seed(group, it.source, it.index), _SR_SALT)

    def _padded(self, n: int) -> int:
        return -(-n // self.block_size) * self.block_size

    def _global_numel(self, it: ParamStep) -> int:
        """Elements of ``it``'s whole moment tensor: all ranks' rows of a row-sharded one."""
        if it.low is not None and not it.low_sharded:
            return it.low.numel()
        return math.prod(self._moment_shape(it.group, it.source))

    def _is_8bit(self, it: ParamStep) -> bool:
        """Decided on the global size, so that every rank and one process decide alike."""
        st = it.state
        layout = self._layout(it.group)
        if layout.codes[0] in st:
            return True
        return layout.dense not in st and self._global_numel(it) >= self.min_8bit_size

    @staticmethod
    def _rows_of_moments(group: dict[str, Any], p: torch.Tensor) -> RowShard | None:
        """``p``'s RowShard when its moments hold only this rank's rows (a row-sharded full-rank or
        right-side weight); None for a plain parameter or a left-side one (moments r'×n on every rank)."""
        shard = row_shard(p)
        if shard is None or ("rank" in group and resolve_side(group["proj_side"], p.shape) == LEFT):
            return None
        return shard

    def _local_rows(self, it: ParamStep) -> tuple[int, tuple[int, ...], int] | None:
        """For a moment that holds only this rank's rows: (its first global row, its local shape,
        the global number of elements); None for a moment held whole."""
        if not it.low_sharded:
            return None
        shape = self._moment_shape(it.group, it.source)
        return it.shard.offset, (it.shard.rows, *shape[1:]), math.prod(shape)

    def _table_width(self, cols: int) -> int:
        """t: the most blocks one row of ``cols`` elements can touch in the flat tensor (its start
        is a multiple of gcd(cols, block_size) modulo block_size)."""
        step = math.gcd(cols, self.block_size)
        return (self.block_size - step + cols - 1) // self.block_size + 1

    def _block_index(self, row0: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """(rows, t) int64: for each local row (global row0 + i), the local indices of the blocks its
        elements fall in, the last one repeated where it touches fewer than t. Local block 0 starts
        at global element row0·cols (block-aligned: :meth:`_check_blocks`)."""
        first = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device) * cols
        lo, hi = first // self.block_size, (first + cols - 1) // self.block_size
        width = torch.arange(self._table_width(cols), dtype=torch.int64, device=device)
        return torch.minimum(lo[:, None] + width, hi[:, None]) - (row0 * cols) // self.block_size

    def _check_blocks(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """ValueError, before anything is changed, when ``p``'s moments are 8-bit and held by rows
        but some rank's first element is not the start of a block of the whole flattened moment."""
        shard = self._rows_of_moments(group, p)
        st = self.state.get(p) or {}
        layout = self._layout(group)
        if shard is None or layout.dense in st:
            return
        shape = self._moment_shape(group, p)
        numel = math.prod(shape)
        rows = shape[0] if shape else 0
        if (layout.codes[0] not in st and numel < self.min_8bit_size) or rows == 0:
            return
        cols = numel // rows
        world = torch.distributed.get_world_size(shard.group)
        chunk = -(-rows // world)  # the split of sharding.row_shard: rank k holds [k·c, min((k+1)·c, m))
        starts = {k * chunk for k in range(world) if k * chunk < rows}
        if shard.rows:
            starts.add(shard.offset)
        bad = sorted(r for r in starts if r * cols % self.block_size)
        if bad:
            split = ", ".join(f"[{r}, {min(r + chunk, rows)})" for r in range(0, rows, chunk))
            raise ValueError(
                f"{type(self).__name__}: parameter #{self.index_of(p)} of shape {tuple(p.shape)} keeps 8-bit moments "
                f"of shape {tuple(shape)} split by rows over {world} ranks as {split}; the rank holding rows from "
                f"{bad[0]} starts at element {bad[0] * cols} of the flattened moments, not a multiple of "
                f"block_size={self.block_size}, so its quantization blocks would not be those of one process. "
                f"Use a block_size that divides {chunk * cols} ({chunk} rows × {cols}), or keep tensors of this size "
                f"in fp32 with min_8bit_size > {numel}"
            )

    def _fuses(self, it: ParamStep) -> bool:
        """8-bit moments are decoded and encoded around the step: only fp32-moment items fuse."""
        return super()._fuses(it) and not self._is_8bit(it)

    @staticmethod
    def _decode(st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (M, V) from a state's codes, each of n_pad elements (the padding decodes to 0)."""
        return decode_moments(st[M_CODES], st[M_SCALES], st[V_CODES], st[V_SCALES], st[V_ZEROS])

    def _decode_rows(self, st: dict[str, Any], row0: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_decode` of a state stored by rows (rows from global row ``row0``, moments of local
        ``shape``): the flat codes and per-block scales rebuilt, fp32 (M, V) of the local n_pad."""
        n = math.prod(shape)
        if n == 0:  # a rank that holds no rows (m < world size)
            device = st[M_CODES].device
            return torch.zeros(0, device=device), torch.zeros(0, device=device)
        first, second = self._decode(self._flat_from_rows(st, ADAM_LAYOUT, row0, shape))
        first[n:] = 0.0  # the global tail's padding, which one process stores as codes of 0
        second[n:] = 0.0
        return first, second

    def _flat_from_rows(
        self, st: dict[str, Any], layout: Layout, row0: int, shape: tuple[int, ...]
    ) -> dict[str, torch.Tensor]:
        """The flat tensors of a ``layout`` state stored by rows (rows from global row ``row0``, local
        shape ``shape`` of n > 0 elements): each code tensor (n_pad,), its tail padded with code 0
        (decode it, then zero elements [n, n_pad)), each per-block table back to (n_pad/block_size,)."""
        n = math.prod(shape)
        n_pad = self._padded(n)
        device = st[layout.codes[0]].device
        index = self._block_index(row0, shape[0], n // shape[0], device).reshape(-1)
        flat: dict[str, torch.Tensor] = {}
        for key in layout.codes:
            codes = st[key].reshape(-1)
            flat[key] = codes if n_pad == n else torch.cat([codes, codes.new_zeros(n_pad - n)])
        for key in layout.per_block:
            table = st[key]
            flat[key] = table.new_empty(n_pad // self.block_size).scatter_(0, index, table.reshape(-1))
        return flat

    def _store_rows(
        self,
        st: dict[str, Any],
        layout: Layout,
        row0: int,
        shape: tuple[int, ...],
        flat: dict[str, torch.Tensor],
        device: torch.device,
    ) -> None:
        """Store this rank's rows of a ``layout`` state by rows (module docstring), from its flat
        tensors (``flat``: each code tensor of ≥ n elements, each per-block one of the local blocks;
        empty for a rank that holds no rows): the codes with the local ``shape``, each per-block
        tensor as a (rows, t) table."""
        n = math.prod(shape)
        if n == 0:  # a rank that holds no rows (m < world size): empty codes and tables
            empty = torch.zeros((0, self._table_width(math.prod(shape[1:]))), device=device)
            st.update({key: torch.zeros(shape, dtype=torch.uint8, device=device) for key in layout.codes})
            st.update({key: empty.clone() for key in layout.per_block})
            return
        for key in layout.codes:
            codes = flat[key]
            st[key] = (codes if codes.numel() == n else codes[:n].clone()).view(shape)
        index = self._block_index(row0, shape[0], n // shape[0], device)
        for key in layout.per_block:
            st[key] = flat[key][index]

    def _encode(self, group: dict[str, Any], it: ParamStep, first: torch.Tensor, second: torch.Tensor) -> None:
        """Store the fp32 (M, V) of n_pad elements (both overwritten) as codes, after step t ≥ 1.

        Rounding positions are those of the whole moment: for this rank's rows of a row-sharded one,
        a stream of 2·(global n_pad) per step and the rows' global flat start added (module docstring)."""
        st = it.state
        bound = moment_bound(group["betas"])
        rows = self._local_rows(it)
        if rows is None:
            offset = (st["step"] - 1) * 2 * first.numel()  # positions never reused: resume and reruns are exact
            qm, qv = encode_moments(first, second, self.block_size, bound, st[QSEED], offset)
            st[M_CODES], st[M_SCALES] = qm.codes, qm.scales
            st[V_CODES], st[V_SCALES], st[V_ZEROS] = qv.codes, qv.scales, qv.zeros
            return
        row0, shape, numel = rows
        n, total = math.prod(shape), self._padded(numel)
        flat: dict[str, torch.Tensor] = {}
        if n:  # (a rank that holds no rows stores empty codes and tables)
            offset = (st["step"] - 1) * 2 * total
            cols = n // shape[0]
            qm, qv = encode_moments(
                first, second, self.block_size, bound, st[QSEED], offset, start=row0 * cols, total=total
            )
            flat = {M_CODES: qm.codes, V_CODES: qv.codes, M_SCALES: qm.scales, V_SCALES: qv.scales, V_ZEROS: qv.zeros}
        self._store_rows(st, ADAM_LAYOUT, row0, shape, flat, first.device)

    def dequantized_moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``p``'s (M, V) as fp32 tensors of the moment's shape (decoded, or copies of fp32 moments);
        None before ``p``'s first step. For a row-sharded ``p``: this rank's rows of them (a
        left-side weight's moments whole)."""
        st = self.state.get(p, {})
        if M_CODES in st:
            group = self._group_of(p)
            shard = self._rows_of_moments(group, p)
            if shard is not None:  # this rank's rows
                shape = tuple(st[M_CODES].shape)
                first, second = self._decode_rows(st, shard.offset, shape)
            else:
                shape = self._moment_shape(group, p)
                first, second = self._decode(st)
            n = math.prod(shape)
            return first[:n].view(shape), second[:n].view(shape)
        if "exp_avg" in st:
            return st["exp_avg"].float().clone(), st["exp_avg_sq"].float().clone()
        return None

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @staticmethod
    def _moment_shape(group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
        """Shape of ``p``'s moments: the projected D×r' shape in a ``rank`` group, else ``p``'s."""
        if "rank" not in group:
            return tuple(p.shape)
        side = resolve_side(group["proj_side"], p.shape)
        return tuple(lowrank_shape(p.shape, side, effective_rank(group["rank"], p.shape)))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None, *, grads_finite: bool = False):
        """The base step, after checking that the 8-bit moments of every row-sharded parameter with
        a gradient start a block on every rank (:meth:`_check_blocks`): a misaligned one raises
        before any parameter's state or weight is changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None or ("rank" in group and projected_grad(p) is not None):
                    self._check_blocks(group, p)
        super().step(grads_finite=grads_finite)
        return loss

    def prepare(
        self, group: dict[str, Any], p: torch.Tensor, proj: Projector | None, grad: torch.Tensor | None = None, **kw
    ) -> ParamStep:
        self._check_blocks(group, p)  # (again, for drivers that call prepare without step)
        # The base class keeps P_old for state transfer only when it finds fp32 "exp_avg".
        state = self.state[p]
        if (
            proj is not None
            and group["state_transfer"]
            and M_CODES in state
            and proj.has_basis(state)
            and self.refresh_due(group, state)
        ):
            old = proj.matrix(state, proj_like(p, p.grad if grad is None else grad))
            item = super().prepare(group, p, proj, grad, **kw)
            if item.snapshot is not None:  # refreshed (not dropped for a non-finite gradient)
                item.proj_old = old
            return item
        return super().prepare(group, p, proj, grad, **kw)

    def _step_items(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """fp32-moment items through the optimizer's own path; 8-bit ones one weight at a time:
        decode, (transfer,) update the moments, the weight's step, encode."""
        eight = [self._is_8bit(it) for it in items]
        dense = [it for it, q in zip(items, eight, strict=True) if not q]
        if dense:
            super()._step_items(group, dense)
        for it in (it for it, q in zip(items, eight, strict=True) if q):
            self._step_8bit(group, it)

    def _step_8bit(self, group: dict[str, Any], it: ParamStep) -> None:
        beta1, beta2 = group["betas"]
        st = it.state
        low = it.low.float()
        it.low = None
        n = low.numel()
        rows = self._local_rows(it)
        if M_CODES in st:
            first_pad, second_pad = self._decode(st) if rows is None else self._decode_rows(st, rows[0], rows[1])
        else:
            st[QSEED] = self._rounding_seed(group, it)
            first_pad = torch.zeros(self._padded(n), dtype=torch.float32, device=low.device)
            second_pad = torch.zeros_like(first_pad)
        first, second = first_pad[:n].view(low.shape), second_pad[:n].view(low.shape)
        if it.proj_old is not None:
            transfer_moments(first, second, it.proj_old, self.full_proj_matrix(it), st["proj_side"])
        if it.lowrank and it.param.dtype == torch.uint8:  # an INT8 weight: the fused op, on the decoded moments
            it.low, low = low, None
            self._fused_step(group, it, [first], [second])
        else:
            first.mul_(beta1).add_(low, alpha=1.0 - beta1)
            second.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            del low
            self._weight_step(group, it, first, second)
        self._encode(group, it, first_pad, second_pad)

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        """The base's keys plus the 8-bit ones: a row-sharded full-rank or right-side weight stores
        its codes and its (rows, t) scale tables by rows (module docstring), dim 0 being the
        parameter's rows, so a sharded checkpoint saves them as DTensors laid out as the parameter
        and a resume on another number of processes reads each rank's rows of them (its first step
        then checks that the new split is block-aligned). A left-side weight's 8-bit state is the
        same on every rank and saved once, as its fp32 moments are."""
        keys = super().sharded_state_keys(p)
        return keys if self.state[p].get("proj_side") == LEFT else (*keys, *self._layout(self._group_of(p)).keys)

    def _check_param_state(
        self, name: str, gi: int, idx: int, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]
    ) -> None:
        super()._check_param_state(name, gi, idx, group, p, st)
        layout = self._layout(group)
        if layout.codes[0] not in st:
            return
        low_shape = tuple(self._moment_shape(group, p))
        if self._rows_of_moments(group, p) is not None:  # stored by rows (the global shapes of a sharded load)
            codes, per_block = low_shape, (low_shape[0], self._table_width(math.prod(low_shape[1:])))
        else:
            n_pad = self._padded(math.prod(low_shape))
            codes, per_block = (n_pad,), (n_pad // self.block_size,)
        expected = {**dict.fromkeys(layout.codes, codes), **dict.fromkeys(layout.per_block, per_block)}
        for key, size in expected.items():
            t = st.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != size:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
                raise ValueError(
                    f"{name}: parameter {idx} (group {gi}, shape {tuple(p.shape)}): saved '{key}' is {got}, "
                    f"expected shape {size} for moments of shape {low_shape} in blocks of {self.block_size}: "
                    "the state was saved for a different model, rank or block_size"
                )


class GaLoreAdamW8bit(EightBitMoments, GaLoreAdamW):
    """:class:`~fastgrad.optim.GaLoreAdamW` whose Adam moments are stored in 8 bits per element.

    Param groups, keys, defaults, modes (``faithful``), update rule, NaN/Inf policy and checkpoint
    checks are GaLoreAdamW's (see its docstring): a group with ``rank`` is low-rank and its moments
    have the projected shape (D×r'); any other group is plain HF-style AdamW. Defaults: lr 1e-3,
    β (0.9, 0.999), ε 1e-6 (added to √V without bias correction), weight_decay 0: GaLoreAdamW's,
    i.e. the recipes' HF AdamW. galore-torch's bitsandbytes GaLoreAdamW8bit has bnb's ε 1e-8 inside
    the bias correction and weight_decay 1e-2 (§2.5); the 8-bit encoding needs no larger ε (updates
    are bounded by C whatever ε, see below), so the GaLoreAdamW defaults are kept for
    comparability: with fp32 moments this class *is* GaLoreAdamW, bitwise.

    8-bit arguments:
      ``block_size`` (256, bitsandbytes ≥ 0.44): elements per quantization block (one fp32 scale,
      plus one fp32 zero for V); ``min_8bit_size`` (4096, as bitsandbytes): a moment with fewer
      elements (the *projected* shape for a low-rank weight) keeps fp32 ``exp_avg``/``exp_avg_sq``
      exactly like GaLoreAdamW. The layout is chosen at a weight's first step and kept.

    Representation (module docstring): V as V^(1/4) asymmetric per block, M as r = M/√V̂ clamped to
    ±C symmetric per block, both with stochastic rounding. Measured with this class and variants
    of its encoding on the tests' tiny LLaMA memorising 4 batches (AdamW lr 3e-3, every tensor of
    ≥ 1024 elements in 8 bits, 200 steps; final loss / largest per-coordinate |ΔW| in units of lr):
    torch AdamW fp32 0.0149 / 1.37; linear M + linear V 2.42 / 2.0e6; linear M + √V 0.072 / 1.3e4;
    linear M + V^(1/4) 0.0148 / 30; r + √V 0.0148 / 1.38; r + V^(1/4) (this) 0.0148 / 1.37. After
    50 steps (tests/test_optim_8bit.py) linear M + V is at 3.28 where fp32 and this are at 1.35.
      * V linear (codes spread evenly between a block's min and max) cannot hold V's range: V is a
        square and spans orders of magnitude within a block; entries below 1/255 of the block's
        largest decode to 0 (or one step), √V̂ collapses and M/(√V̂+ε) explodes. A root compresses
        the range (V^(1/4): 4 decades of V in 1 of y).
      * M linear fails the other way: an entry 100× below its block's largest keeps about one code,
        and that noise divided by its own small √V dominates its update. r = M/√V̂ is what the
        update uses (N ≈ r); exact Adam has |r| ≤ C, and r's error (a code step is max|r|/127 in its
        block) is the same for every coordinate whatever its scale. Clamping r to ±C keeps
        Adam's invariant |M̂| ≤ C·√V̂ in the stored pair, and the recurrence keeps it (see
        :func:`moment_bound`), so every update has |M/(√V+ε)| ≤ C per coordinate: no quantization
        noise can make it explode.
      * V^(1/4) rather than √V: stochastic rounding makes the stored root unbiased, so V̂ = ŷ⁴ is
        biased up by ≈ 6·Var(ŷ)/y² per encoding, and the EMA (which forgets 1e-3 per step) lets
        that settle at a floor relative to the block's largest entry. On a synthetic stream (4096
        coordinates, gradient scales log-uniform over 3 decades, 2000 steps) the mean |√V̂/√V − 1|
        of the smallest fifth of the coordinates is 1.1 with √V, 0.18 with V^(1/4), and the update
        direction N differs from fp32 Adam's on the same gradients by (relative 2-norm) 1.9 for linear M
        (clipped to ±C·√V̂) + √V, 1.5 for linear M + V^(1/4), 1.2 for r + √V, 0.15 for r + V^(1/4).
      * stochastic rounding (counter-based Philox: a seed per parameter, counters advanced by
        2·n_pad each step, so a resumed run draws the same numbers): round-to-nearest is biased, and
        an EMA step smaller than half a code ((1−β2)·(g² − V) is 1e-3 of V) would be rounded away
        every time; with stochastic rounding every encoding is unbiased (y and M exactly).
    Accuracy (tests/test_optim_8bit.py, real gradients of the tiny LLaMA): after 30 steps the
    dequantized M and V are within 1.4% and 1.7% (relative 2-norm) of fp32 moments fed the same
    gradients; after 50 steps of training the loss is within 0.2% (AdamW8bit vs torch AdamW) and
    2% (GaLoreAdamW8bit vs GaLoreAdamW, every projected moment in 8 bits) of the fp32 optimizer's.

    State of an 8-bit weight (n = elements of the moment, n_pad = n rounded up to block_size,
    blocks = n_pad / block_size): ``step`` int; ``exp_avg_qseed`` int (the rounding seed);
    ``exp_avg_codes`` uint8 (n_pad,), ``exp_avg_scales`` fp32 (blocks,); ``exp_avg_sq_codes``
    uint8 (n_pad,), ``exp_avg_sq_scales`` and ``exp_avg_sq_zeros`` fp32 (blocks,); plus the
    projector's keys. Bytes: 2·n_pad + 12·blocks (≈ 2.05 per element for block 256, vs 8 for fp32
    moments and 4 for bf16) + the projector as in GaLoreAdamW. :meth:`state_bytes` sums the tensors.
    A row-sharded (FSDP2) full-rank or right-side weight keeps, on each rank, its rows' moments stored
    by rows (module docstring): codes uint8 of the local moment shape (rows, cols) and the three
    fp32 scale/zero tensors as (rows, t) tables, 2·rows·cols + 12·rows·t bytes (t = 1 when cols
    divides block_size, e.g. a projected R of r' = 128: 12 bytes per row, 0.09 per element); the
    blocks, the 8-bit decision and the rounding stream are those of the whole moment, so the codes
    are one process's (the layout requires block_size to divide c·cols, c = ⌈m/W⌉ rows per rank:
    ValueError at the first step otherwise). A sharded checkpoint saves these by rows and resumes
    on any number of processes whose split is block-aligned.
    Resume is bitwise (the rounding stream is a function of the seed and the step). Each step
    decodes one weight's moments to fp32 (transient, the size of that weight's moments), updates
    them, applies the update and re-encodes them before the next weight: fastgrad ops
    ``quantize_int8`` ×2 and ``dequantize_int8`` ×3 per 8-bit weight and step.

    ``state_transfer=True`` re-expresses the decoded moments in the new basis before they are
    updated; a rotation can take |M| above C·√V (by at most √r'), which the clamp then shortens.
    """


class AdamW8bit(GaLoreAdamW8bit):
    """AdamW with 8-bit blockwise moments: :class:`GaLoreAdamW8bit`'s full-rank path, with
    torch.optim.AdamW's update rule.

    ``AdamW8bit(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``
    (bitsandbytes' AdamW8bit defaults). Per step t with gradient G:
        W ← W·(1 − lr·wd)                                 # decoupled, before the update (torch)
        M ← β1 M + (1−β1) G;  V ← β2 V + (1−β2) G⊙G
        W ← W − lr/(1−β1^t) · M / (√V/√(1−β2^t) + ε)     # torch ε placement (= bnb's ε·√(1−β2^t))
    so with fp32 moments (tensors below ``min_8bit_size``) it is torch.optim.AdamW to rounding.
    Moments, ``block_size``, ``min_8bit_size``, state, NaN/Inf policy and checkpoints: as
    GaLoreAdamW8bit. Param groups may not carry ``rank`` (use GaLoreAdamW8bit).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = BLOCK_SIZE,
        min_8bit_size: int = MIN_8BIT_SIZE,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            True,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            nonfinite=nonfinite,
        )

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        raise ValueError("AdamW8bit: param groups may not have 'rank' (low-rank groups: use GaLoreAdamW8bit)")

    def _direction(
        self, group: dict[str, Any], step: int, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        scalars = adam_scalars(group, step, "torch")
        denom = (second.sqrt() / scalars.v_divisor).add_(scalars.eps)
        return scalars.step_size, torch.div(first, denom, out=denom)
