"""The per-rank memory of one ``fastgrad pretrain --fsdp`` step over N processes (``fastgrad memory
--fsdp N``): the replay of :mod:`fastgrad.train.memory.model` with FSDP2's (``fully_shard``)
allocations at each unit's boundaries, and the optimizer stepping the rank's rows.

The units are those ``fastgrad pretrain --fsdp`` makes: each decoder layer, and the root (embedding,
final norm, head); with Q-GaLore each layer's QLinear layers are one more unit, never cast (uint8
codes, fp32 scales and zeros, sharded by rows and all-gathered as such). FSDP splits every parameter
by rows, c = ⌈m/N⌉ per rank, and pads each rank's storage to c rows. Rank 0 holds c rows of every
parameter, the most of any rank: it is the rank reported.

Included, per rank:

* **Persistent**: the sharded weights (c rows of each; the rotary tables whole), the optimizer state
  of the rank's rows (fastgrad.optim.sharding: moments of c rows; a left-side low-rank weight's r'×n
  moments whole on every rank; the projectors P whole on every rank; 8-bit moments stored by rows),
  and after backward the sharded gradients: each unit's reduce-scatter output (c rows of each
  parameter, in the weights' dtype), or for low-rank-gradient layers between refreshes their
  averaged R (c×r' on the right side, the whole r'×n on the left) instead of G.
* **All-gathers**: a unit's all-gather buffer (N × its padded shard, in param_dtype under
  --mixed-precision, which casts the shard first) and its unsharded parameters. In forward the
  previous unit's buffer is kept until the next unit's parameters are copied out of its own; the root
  stays unsharded until the end of backward; in backward each unit prefetches the next one's
  all-gather (one unit ahead) before it computes.
* **Reduce-scatters**: a unit's unsharded gradients (compute dtype) until its post-backward; the
  reduce-scatter input (N × the padded shard, in reduce_dtype: fp32 under --mixed-precision), kept
  until the next unit's post-backward; the output (the sharded gradients). With --grad-accum every
  unit's unsharded gradients are kept (in reduce_dtype) until the last micro-batch, which alone
  reduce-scatters. A low-rank-gradient layer's R (of the whole weight, from the rank's batch) is
  averaged over the ranks in the layer's backward, as the last micro-batch delivers it, beside the
  layer's activations and its unit's unsharded parameters: on the right side a copy padded to N·c
  rows (released at once) reduce-scattered into the rank's c rows, on the left side an all-reduce in
  place; the whole R is released as the layer returns, so the ranks hold one weight's at a time.
  With --grad-accum each weight's R is summed whole over the earlier micro-batches (the units'
  gradient sync is off) and the sum averaged at the last one's delivery.
* **The optimizer step on the rank's rows**: the single-process replay of each optimizer sized to c
  rows; at a subspace refresh, the gathered G of one weight (``full_tensor()``, m×n in the gradient's
  dtype) beside its SVD; Muon's gathered update (m×n) and the Newton–Schulz iteration of the whole
  matrix, one weight at a time.
* **Activations** of the rank's batch (--batch-size is per process), in the compute dtype; under
  --mixed-precision each layer's cast of the rotary tables.

On CPU (gloo) the collectives' own copies are counted as they are measured: two transient copies of
an all-gather's output, a copy of a reduce-scatter's input, the coalesced input of a DTensor gather
(each counted as released at once; gloo's worker thread releases them). NCCL makes none. Not
modelled: NCCL's and the CUDA caching allocator's buffers; the index arithmetic of DTensor's shards
(a few hundred bytes at a time) and 0-d norms; the rotary casts are counted as released after the
q, k, v projections' backward (they are, a little earlier, in the rotary embedding's).

Validation (tests/test_memory_fsdp.py, two gloo processes on CPU stepped as ``fastgrad pretrain
--fsdp`` steps them): rank 0's weights, gradients after backward and optimizer state byte for byte,
and the profiler's peak of each phase within 2% (gloo releases its buffers, and Muon8bit its
replaced codes, at times that vary between runs by up to 11 KB; one process's replay is held to
1e-4 in tests/test_memory.py), for AdamW, GaLore (a refresh, and between refreshes), GaLore8bit,
Fira, APOLLO, Muon, Muon8bit, GaLoreMuon, QGaLoreMuon, Q-GaLore and Q-GaLore8bit, with --mixed-precision,
--grad-accum, activation checkpointing and uneven splits (R averaged in backward with and without
--grad-accum, and where that is the peak of backward).
"""

from __future__ import annotations

import dataclasses
import math
import types

from fastgrad.models.llama import LlamaConfig
from fastgrad.nn.qlinear import fit_group_size
from fastgrad.optim.galore8bit import GaLoreAdamW8bit
from fastgrad.train.config import TrainConfig
from fastgrad.train.memory.model import (
    _DTYPE_BYTES,
    BLOCK_8BIT,
    MIN_8BIT_NUMEL,
    NS_BYTES,
    _moments_bytes,
    _Step,
    _Tape,
    _Weight,
)
from fastgrad.train.optimizers import QLINEAR_GROUP_SIZE


def shard_rows(m: int, processes: int) -> int:
    """c = ⌈m/N⌉: the rows FSDP2 gives rank 0 of a dim 0 of m (every rank's storage is padded to it)."""
    return -(-m // processes)


def _table_width(cols: int) -> int:
    """The blocks one row of a moment stored by rows can touch (GaLoreAdamW8bit's own rule)."""
    return GaLoreAdamW8bit._table_width(types.SimpleNamespace(block_size=BLOCK_8BIT), cols)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A tensor FSDP shards by rows (named after its weight): its whole shape, and bytes per element
    stored, all-gathered, of its unsharded gradient (0: FSDP reduces none) and reduce-scattered (the
    sharded gradient's too)."""

    name: str
    shape: tuple[int, ...]
    stored: int
    gathered: int
    grad: int
    reduced: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def padded(self, processes: int) -> int:
        """Elements of one rank's shard, padded to c rows."""
        return shard_rows(self.shape[0], processes) * (self.numel // self.shape[0])


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A fully_shard unit: its tensors in parameter order."""

    name: str
    tensors: tuple[_Tensor, ...]

    def gathered(self, processes: int) -> int:
        """The all-gather buffer: N × the padded shards, in the all-gathered dtypes."""
        return processes * sum(t.padded(processes) * t.gathered for t in self.tensors)

    def shard_cast(self, processes: int) -> int:
        """The rank's shard cast to param_dtype before the all-gather (0 when nothing is cast)."""
        if all(t.gathered == t.stored for t in self.tensors):
            return 0
        return sum(t.padded(processes) * t.gathered for t in self.tensors)

    def unsharded(self, processes: int) -> int:
        """The unsharded parameters: each its own allocation of N padded shards (a view of its first
        m rows is the parameter)."""
        return self.gathered(processes)

    def sharded(self, processes: int) -> int:
        """The rank's padded shards, as stored."""
        return sum(t.padded(processes) * t.stored for t in self.tensors)


class _ShardedOptimizer(_Step):
    """The optimizer's step on rank 0's rows of every weight (c rows; the single-process replay, in
    the weights' dtype), with what the rows need from the other ranks: the gathered G of a refresh,
    Muon's gathered update."""

    def __init__(self, cfg: TrainConfig, mc: LlamaConfig, device: str, sm_count: int, processes: int) -> None:
        super().__init__(cfg, mc, device, sm_count)
        self.world = processes
        self._refresh_step = False  # whether the step is a refresh step (of the subspace; set per replay)
        self.weights = [
            _Weight(w.name, (shard_rows(w.shape[0], processes), *w.shape[1:]), w.proj, whole=w.shape)
            for w in self.weights
        ]

    def _by_rows(self, w: _Weight) -> bool:
        """Whether ``w``'s moments hold the rank's rows only (a full-rank or right-side weight's);
        a left-side weight's r'×n moments are whole on every rank."""
        return not (self.is_lowrank(w) and self.is_left(w))

    def _whole_moment(self, w: _Weight) -> int:
        """Elements of ``w``'s whole moment (all ranks' rows)."""
        numel, _ = self._consumed(w)
        return numel // w.shape[0] * w.full_shape[0] if self._by_rows(w) else numel

    def _is_8bit(self, w: _Weight) -> bool:
        """8-bit moments are decided on the whole moment's size, as every rank decides alike."""
        return self.eight_bit and self._whole_moment(w) >= MIN_8BIT_NUMEL

    def state_bytes(self, w: _Weight) -> int:
        """As one process holds it, sized to the rows; 8-bit moments held by rows are stored by rows
        (GaLoreAdamW8bit): the codes of the rows, each per-block table (rows, t)."""
        total = super().state_bytes(w)
        if not self.eight_bit:
            return total
        if self.is_muon(w):  # Muon8bit's momentum: the codes of the rows, one (rows, t) scale table
            if not self._is_8bit(w) or not self._by_rows(w):
                return total
            rows, t = self._table_rows(w)
            return w.numel + rows * t * 4
        numel, elem = self._consumed(w)
        if not self._is_8bit(w):
            moments = 2 * numel * elem
        elif self._by_rows(w):
            moments = 2 * numel + 3 * w.shape[0] * _table_width(numel // w.shape[0]) * 4
        else:
            moments = _moments_bytes(numel, elem, True)
        return total - _moments_bytes(numel, elem, True) + moments

    def _gather(self, tape: _Tape, w: _Weight, elem: int | None = None) -> int:
        """``full_tensor()`` of a tensor laid out as ``w`` (rows sharded) in the gradient's dtype (or
        ``elem`` bytes per element): the all-gather's output of N × c rows, of which the whole tensor
        is a view (its first m rows), and on CPU gloo's copies (the coalesced input, the output).
        Leaves it alive, returns its bytes."""
        elem = self.grad_elem(w) if elem is None else elem
        padded = w.numel * self.world * elem
        tape.alloc(padded)
        if self.device == "cpu":
            tape.temp(w.numel * elem)  # the coalesced input
            tape.temp(padded)  # gloo's output
        return padded

    def grad_elem(self, w: _Weight) -> int:
        """Bytes per element of ``w``'s gradient: a QLinear's fp32, else the weights' dtype."""
        return 4 if (self.quantized and w.proj) else self.e

    def _refresh(self, tape: _Tape, w: _Weight) -> None:
        """A refresh from the gathered G (``grad.full_tensor()``), released once P is computed."""
        whole = self._gather(tape, w)
        super()._refresh(tape, w)
        tape.free(whole)

    def refresh_transient(self, w: _Weight) -> int:
        """The gathered G (N × c rows) beside the refresh's working set."""
        gathered = self.optim not in ("apollo", "apollo-mini")
        return super().refresh_transient(w) + (w.numel * self.world * self.grad_elem(w) if gathered else 0)

    def _muon_update(self, tape: _Tape, w: _Weight) -> None:
        """Muon's step of a sharded weight: U of the rank's rows (held by the caller until the step
        returns), gathered (the whole m×n, the same on every rank), its ns_dtype copy, Newton–Schulz
        of the whole matrix (the gathered U released after it), its rows added to W."""
        m, n = w.full_shape
        u_elem = self._muon_momentum(tape, w)  # U of the rows: grad.lerp(buf, momentum)
        rows = w.numel * u_elem
        whole = self._gather(tape, w, u_elem)
        cast = m * n * NS_BYTES if u_elem != NS_BYTES else 0
        tape.alloc(cast)  # update.to(ns_dtype)
        self._newton_schulz(tape, m, n)
        tape.free(cast + whole)  # the argument, then `del update`
        if self.e != NS_BYTES and self.device == "cpu":
            tape.temp(w.numel * self.e)  # W.add_(O's rows): in W's dtype (CPU)
        tape.free(m * n * NS_BYTES + rows)

    def _gather_low(self, tape: _Tape, w: _Weight, elem: int) -> int:
        """GaLoreMuon: a right-side U (the rank's rows of m×r') gathered (N × c rows) for the
        iteration; a left-side U (r'×n) is whole on every rank."""
        if self.is_left(w):
            return 0
        return self._gather(tape, _Weight(w.name, (w.shape[0], self.rank(w))), elem)

    def _load_momentum(self, tape: _Tape, w: _Weight, blocks: int) -> int:
        """Muon8bit's momentum stored by rows: the flat scales rebuilt from the (rows, t) table
        through the block index (as :meth:`_load_8bit`, one per-block table)."""
        rows, t = self._table_rows(w)
        tape.alloc(rows * t * 8)  # _block_index
        tape.alloc(blocks * 4)
        tape.free(rows * t * 8)
        return blocks * 4

    def _store_momentum(self, tape: _Tape, w: _Weight, n_pad: int, blocks: int) -> None:
        """The new codes and the (rows, t) table gathered from the flat scales; the old state is
        released when the step returns (as :meth:`_store_8bit`)."""
        rows, t = self._table_rows(w)
        tape.alloc(rows * t * 8)  # _block_index
        tape.alloc(rows * t * 4)  # the table
        tape.free(rows * t * 8 + 8 * blocks)  # and the flat scales and the unused zeros
        self._replaced += w.numel + rows * t * 4

    def _table_rows(self, w: _Weight) -> tuple[int, int]:
        """(rows, t) of the per-block tables of a moment stored by rows."""
        numel, _ = self._consumed(w)
        return w.shape[0], _table_width(numel // w.shape[0])

    def _load_8bit(self, tape: _Tape, w: _Weight, blocks: int) -> int:
        """Moments stored by rows: the flat per-block tables rebuilt from the (rows, t) ones through
        a (rows, t) int64 block index (its few temporaries counted as one)."""
        if not self._by_rows(w):
            return 0
        rows, t = self._table_rows(w)
        tape.alloc(rows * t * 8)  # _block_index
        tape.alloc(3 * blocks * 4)
        tape.free(rows * t * 8)
        return 3 * blocks * 4

    def _store_8bit(self, tape: _Tape, w: _Weight, n_pad: int, blocks: int) -> None:
        """The new codes (and, stored by rows, the (rows, t) tables gathered from the flat ones)
        replace the old state, which is released only when the step returns (measured)."""
        if self._by_rows(w):
            rows, t = self._table_rows(w)
            tape.alloc(rows * t * 8)  # _block_index
            tape.alloc(3 * rows * t * 4)  # the tables
            tape.free(rows * t * 8 + 16 * blocks)  # and the flat scales and zeros (M's unused ones too)
            self._replaced += 2 * self._consumed(w)[0] + 3 * rows * t * 4
        else:
            tape.free(4 * blocks)  # M's unused zeros
            self._replaced += 2 * n_pad + 12 * blocks

    def _optimizer_step(self, tape: _Tape) -> None:
        self._replaced = 0
        super()._optimizer_step(tape)
        tape.free(self._replaced)


class _FsdpStep(_Step):
    """One step of rank 0 under FSDP2 (module docstring): forward and backward of the whole model in
    the compute dtype with the units' all-gathers and reduce-scatters, then the optimizer's step on
    the rank's rows (:class:`_ShardedOptimizer`, in the weights' dtype)."""

    def __init__(self, cfg: TrainConfig, mc: LlamaConfig, device: str, sm_count: int, processes: int) -> None:
        super().__init__(dataclasses.replace(cfg, dtype=cfg.mixed_precision or cfg.dtype), mc, device, sm_count)
        self.world = processes
        self.stored = _DTYPE_BYTES[cfg.dtype]  # the weights, their sharded gradients, the optimizer state
        self.reduced = 4 if cfg.mixed_precision else self.stored  # MixedPrecisionPolicy(reduce_dtype=fp32)
        self.opt = _ShardedOptimizer(cfg, mc, device, sm_count, processes)
        self.root, self.layers = self._units()
        self._events = True  # FSDP's allocations (off: the activations alone)
        self._recompute = False  # in a checkpoint's recomputation (the units are gathered already)
        self._gather_held = self._prefetched = self._rs_input = 0
        self._due = False  # whether the replayed step refreshes the subspace (set by run)

    def _units(self) -> tuple[_Unit, list[tuple[_Unit, ...]]]:
        """The root unit, and each decoder layer's units (the layer; with QLinear weights, then its
        QLinear unit)."""

        def tensors(ws: list[_Weight]) -> tuple[_Tensor, ...]:
            return tuple(_Tensor(w.name, w.shape, self.stored, self.e, self.e, self.reduced) for w in ws)

        root = _Unit("root", tensors([w for w in self.weights if not w.name.startswith("model.layers.")]))
        layers = []
        for n in range(self.mc.num_layers):
            ws = [w for w in self.weights if w.name.startswith(f"model.layers.{n}.")]
            if not self.quantized:
                layers.append((_Unit(f"layer {n}", tensors(ws)),))
                continue
            qlinear = tuple(t for w in ws if w.proj for t in self._qlinear(w))
            norms = _Unit(f"layer {n}", tensors([w for w in ws if not w.proj]))
            layers.append((norms, _Unit(f"layer {n} QLinear", qlinear)))
        return root, layers

    @staticmethod
    def _qlinear(w: _Weight) -> list[_Tensor]:
        """A QLinear's codes (uint8; their gradient, the layer's G, fp32) and its scales and zeros
        (fp32, a group of a row each; no gradient): never cast (fastgrad.nn.fully_shard_model)."""
        m, n = w.shape
        groups = n // fit_group_size(QLINEAR_GROUP_SIZE, n)
        return [
            _Tensor(w.name, (m, n), 1, 1, 4, 4),
            _Tensor(w.name + ":scales", (m, groups), 4, 4, 0, 0),
            _Tensor(w.name + ":zeros", (m, groups), 4, 4, 0, 0),
        ]

    # ------------------------------------------------------------------ categories
    def weight_bytes(self) -> int:
        units = [self.root, *(u for us in self.layers for u in us)]
        return sum(u.sharded(self.world) for u in units) + 2 * self.mc.max_seq_len * self.mc.head_dim * 4

    def optimizer_state_bytes(self) -> int:
        return self.opt.optimizer_state_bytes()

    def sharded_gradient_bytes(self, refresh: bool) -> int:
        """The gradients after backward (the projected ones averaged over the ranks in it) of a
        refresh step or of one between refreshes: the reduce-scatter outputs (c rows of every weight
        FSDP reduces, in the weights' dtype; a QLinear's G in fp32); the averaged R of the layers that
        compute it (c×r' right side, r'×n left side)."""
        due, self._due = self._due, refresh and self.lowrank and self.optim not in ("apollo", "apollo-mini")
        total = 0
        for w, rows in zip(self.weights, self.opt.weights, strict=True):
            if self._projected(w):
                total += self.opt.low_numel(rows) * self._low_elem()
            else:
                total += rows.numel * (4 if self.quantized and w.proj else self.stored)
        self._due = due
        return total

    def gradient_bytes(self) -> int:
        """Of a refresh step: the sharded gradients and the rows' R the step projects."""
        lows = sum(self.opt.low_bytes(w) for w in self.opt.weights if self.opt.is_lowrank(w))
        return self.sharded_gradient_bytes(refresh=True) + lows

    def activation_bytes(self) -> int:
        self._events = False
        try:
            return super().activation_bytes()
        finally:
            self._events = True

    def projector_bytes(self) -> int:
        return self.opt.projector_bytes()

    def sharding(self) -> dict[str, int]:
        """What sharding splits or adds, per rank (bytes; MemoryBreakdown.sharding)."""
        world, opt = self.world, self.opt
        units = [self.root, *(u for us in self.layers for u in us)]
        reduced = [sum(t.padded(world) * t.reduced for t in u.tensors) * world for u in units]
        refresh = opt.lowrank and self.optim not in ("apollo", "apollo-mini")
        gathered_g = max(
            (w.numel * world * opt.grad_elem(w) for w in opt.weights if refresh and opt.is_lowrank(w)), default=0
        )
        muon = 0
        for w in opt.weights:
            if opt.is_muon(w):
                m, n = w.full_shape
                u_elem = 4 if opt._is_8bit(w) else opt.e  # Muon8bit's decoded momentum: U in fp32
                gathered = w.numel * world * u_elem  # N × c rows
                if opt.is_lowrank(w):  # GaLoreMuon: the r'-wide U, gathered on the right side only
                    r = opt.rank(w)
                    m, n = (r, n) if opt.is_left(w) else (m, r)
                    gathered = 0 if opt.is_left(w) else w.shape[0] * r * world * u_elem
                cast = m * n * NS_BYTES if u_elem != NS_BYTES else 0
                muon = max(muon, gathered + m * n * NS_BYTES + cast + opt.scratch.newton_schulz(m, n, NS_BYTES))
        return {
            "processes": world,
            "sharded weights": self.weight_bytes(),
            "sharded gradients (refresh step)": self.sharded_gradient_bytes(refresh=True),
            "sharded gradients (between refreshes)": self.sharded_gradient_bytes(refresh=False),
            "all-gathered unit (largest: buffer and parameters)": max(2 * u.gathered(world) for u in units),
            "reduce-scatter input (largest unit)": max(reduced),
            "gathered G of a refresh (largest)": gathered_g,
            "Muon's gathered update and Newton-Schulz (largest)": muon,
        }

    # ------------------------------------------------------------------ FSDP's events
    def _all_gather(self, tape: _Tape, unit: _Unit) -> int:
        """``unshard``: the all-gather buffer (and on CPU gloo's two copies of it); the rank's shard
        cast to param_dtype first, released once gathered. Returns the buffer's bytes."""
        gathered, cast = unit.gathered(self.world), unit.shard_cast(self.world)
        tape.alloc(cast)
        tape.alloc(gathered)
        if self.device == "cpu":
            tape.temp(gathered)
            tape.temp(gathered)
        tape.free(cast)
        return gathered

    def _rotary_cast(self) -> int:
        """--mixed-precision: each layer's forward inputs cast to param_dtype, the rotary tables'
        rows (cos and sin, seq × head_dim)."""
        return 2 * self.cfg.seq_len * self.mc.head_dim * self.e if self.cfg.mixed_precision else 0

    def _forward(self, tape: _Tape) -> None:
        if not self._events:
            super()._forward(tape)
            return
        self._gather_held = self._all_gather(tape, self.root)
        tape.alloc(self.root.unsharded(self.world))  # the root stays unsharded until its post-backward
        super()._forward(tape)
        tape.free(self._gather_held)  # the root's post-forward drops the last all-gather buffer
        self._gather_held = 0

    def _unshard_forward(self, tape: _Tape, unit: _Unit) -> None:
        """A unit's pre-forward: all-gathered and copied out; the previous unit's all-gather buffer,
        kept for overlap, released only now."""
        gathered = self._all_gather(tape, unit)
        tape.alloc(unit.unsharded(self.world))
        tape.free(self._gather_held)
        self._gather_held = gathered

    def _layer_forward(self, tape: _Tape, n: int, keep: bool, recompute: bool = False) -> None:
        if not self._events:
            super()._layer_forward(tape, n, keep, recompute)
            return
        tape.alloc(self._rotary_cast())
        if not recompute:  # (a checkpoint's recomputation runs on the parameters its pre-backward gathered)
            self._unshard_forward(tape, self.layers[n][0])
        self._recompute = recompute
        super()._layer_forward(tape, n, keep, recompute)
        if not recompute:
            tape.free(self.layers[n][0].unsharded(self.world))  # post-forward: resharded
            if self.cfg.activation_checkpointing:
                tape.free(self._rotary_cast())  # not saved under a checkpoint

    @staticmethod
    def _layer_of(w: _Weight) -> int:
        return int(w.name.split(".")[2])

    def _linear_forward(self, tape: _Tape, w: _Weight, out: int) -> None:
        """A layer's QLinear unit is all-gathered as its first QLinear (q_proj) runs and resharded
        after its last (down_proj)."""
        qlinear = self._events and self.quantized and w.proj and not self._recompute
        name = w.name.split(".")[-2]
        if qlinear and name == "q_proj":
            self._unshard_forward(tape, self.layers[self._layer_of(w)][1])
        super()._linear_forward(tape, w, out)
        if qlinear and name == "down_proj":
            tape.free(self.layers[self._layer_of(w)][1].unsharded(self.world))

    def _linear_backward(self, tape: _Tape, w: _Weight, dx: int) -> None:
        """The QLinear unit's pre-backward as its first QLinear backward (down_proj's) starts."""
        if self._events and self.quantized and w.name.endswith("down_proj.weight"):
            self._unshard_backward(tape, self._layer_of(w), 1)
        super()._linear_backward(tape, w, dx)

    def _attention_inputs_done(self, tape: _Tape, n: int) -> None:
        """The rotary tables' casts are released by then (in the rotary embedding's backward); the
        QLinear unit's post-backward, once the gradient of its inputs (q, k, v's) is summed."""
        if not self._events:
            return
        tape.free(self._rotary_cast())
        if self.quantized:
            self._post_backward(tape, self.layers[n][1])

    def _backward(self, tape: _Tape) -> None:
        if not self._events:
            super()._backward(tape)
            return
        self._recompute = False
        self._prefetched = self._all_gather(tape, self.layers[-1][0])  # the root's pre-backward prefetch
        super()._backward(tape)
        self._post_backward(tape, self.root)
        tape.free(self._rs_input)  # the root's final callback drops the last reduce-scatter input
        self._rs_input = 0

    def _unshard_backward(self, tape: _Tape, n: int, k: int) -> None:
        """Unit k of layer n's pre-backward: copied out of the prefetched buffer (released), then the
        unit before it in forward order all-gathered (the implicit backward prefetch)."""
        tape.alloc(self.layers[n][k].unsharded(self.world))
        tape.free(self._prefetched)
        order = [(i, j) for i in range(len(self.layers)) for j in reversed(range(len(self.layers[i])))]
        at = order.index((n, k))  # the post-forward order: a layer's QLinear unit before the layer
        i, j = order[at - 1] if at > 0 else (None, None)
        self._prefetched = self._all_gather(tape, self.layers[i][j]) if i is not None else 0

    def _pre_layer_backward(self, tape: _Tape, n: int) -> None:
        self._unshard_backward(tape, n, 0)

    def _post_layer_backward(self, tape: _Tape, n: int) -> None:
        self._post_backward(tape, self.layers[n][0])

    def _low_elem(self) -> int:
        """Bytes per element of a layer's R as delivered: a QLinear's fp32; a LowRankGradLinear's
        in its sharded weight's dtype (computed in the compute dtype, converted)."""
        return 4 if self.quantized else self.stored

    def _deliver(self, tape: _Tape, w: _Weight) -> None:
        """fastgrad.nn.lowrank.deliver_projected_grad of a sharded weight, in its layer's backward:
        R converted to the sharded weight's dtype; in the last micro-batch, whose backward the units
        reduce (set_requires_gradient_sync), the sum of the micro-batches' R averaged over the ranks
        at once (:meth:`_average`), else added into the accumulated one (kept whole). The grad-ready
        hooks do nothing here (no layer-wise driver under FSDP)."""
        if not self._events:
            super()._deliver(tape, w)
            return
        whole = self.low_numel(w) * self._low_elem()  # R of the whole weight, as delivered
        if not self.quantized and self.stored != self.e:
            tape.alloc(whole)  # low.to(grad_dtype)
            tape.free(self.low_bytes(w))
        kept = not self._last or self.is_left(w)  # a whole R stays the projected gradient
        if self._last:
            self._average(tape, w)
        if self._micro > 0 and not kept:
            tape.free(whole)  # the accumulated R (acc.add_(low)), as deliver_projected_grad returns
        if self._micro > 0 or not kept:
            tape.free(whole)  # the R the layer delivered, as the layer's backward returns

    def _grads(self, unit: _Unit) -> list[tuple[_Tensor, int]]:
        """The unit's tensors FSDP has a gradient of in this backward, with its bytes: not a QLinear's
        scales and zeros, not a layer's that delivered R instead (between refreshes)."""
        ws = {w.name: w for w in self.weights}
        return [(t, t.numel * t.grad) for t in unit.tensors if t.grad and not self._projected(ws[t.name])]

    def _hook(self, tape: _Tape, w: _Weight) -> None:
        # --mixed-precision with --grad-accum: FSDP moved the gradient to an fp32 one at the last
        # post-backward, so a later micro-batch's gradient is a new p.grad until its unit's post-backward.
        if self.cfg.mixed_precision and self._micro > 0 and not self._projected(w):
            return
        super()._hook(tape, w)

    def _post_backward(self, tape: _Tape, unit: _Unit) -> None:
        """A unit's post-backward: resharded; then, in the last micro-batch, its gradients
        reduce-scattered (the previous reduce-scatter's input released first; this one's kept), else
        kept unsharded (in reduce_dtype)."""
        grads = self._grads(unit)
        new = sum(g for _, g in grads)
        accumulated = sum(t.numel * t.reduced for t, _ in grads)
        mixed = any(t.reduced != t.grad for t, _ in grads)
        if self._micro > 0 and mixed:  # accumulate_unsharded_grad_if_needed: += into the fp32 ones, then freed
            if self.device == "cpu":
                tape.temp(max((t.numel * t.reduced for t, _ in grads), default=0))  # the mixed add_'s copy
            tape.free(new)
        tape.free(unit.unsharded(self.world))  # reshard
        if not self._last:
            if self._micro == 0 and mixed:  # to_accumulated_grad_if_needed: an fp32 copy
                tape.alloc(accumulated)
                tape.free(new)
            return
        if not grads:
            return
        held = accumulated if mixed and self.cfg.grad_accum > 1 else new
        tape.free(self._rs_input)  # post_backward_rs_wait
        rs_input = sum(t.padded(self.world) * t.reduced for t, _ in grads) * self.world
        tape.alloc(rs_input)
        # foreach_reduce: the gradients are released once copied in, but for the last one, which
        # its loop variable holds until the reduce-scatter is issued
        last = (grads[-1][1] if held == new else grads[-1][0].numel * grads[-1][0].reduced) if self.world > 1 else 0
        tape.free(held - last)
        tape.alloc(rs_input // self.world)  # the output: the sharded gradients
        if self.device == "cpu":
            tape.temp(rs_input)  # gloo's copy of the input
        tape.free(last)
        self._rs_input = rs_input

    def _average(self, tape: _Tape, w: _Weight) -> None:
        """fastgrad.nn.lowrank._average_over_ranks of ``w``'s whole R: on the right side, copied into
        a buffer padded to N·c rows (released when it returns) and reduce-scattered into a c-row one
        (the rank's rows, kept); on the left side all-reduced in place."""
        if self.is_left(w):
            return
        rows = shard_rows(w.shape[0], self.world) * self.rank(w) * self._low_elem()
        tape.alloc(rows * self.world)  # padded
        tape.alloc(rows)
        if self.device == "cpu":
            tape.temp(rows * self.world)  # gloo's copy
        tape.free(rows * self.world)

    # ------------------------------------------------------------------ the optimizer step
    def run(self, refresh: bool, trace: list[tuple[str, int]] | None = None) -> dict[str, int]:
        self.opt._refresh_step = refresh and self.lowrank
        return super().run(refresh, trace)

    def _optimizer_step(self, tape: _Tape) -> None:
        opt = self.opt
        opt._due, opt._micro, opt._last = self._due, self._micro, self._last
        opt._snapshots = opt._norms = 0
        opt._optimizer_step(tape)
