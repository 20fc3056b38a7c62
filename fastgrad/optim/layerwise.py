"""Layer-wise ("fused backward") optimizer stepping that keeps accumulation, clipping, the LR
schedule, the NaN/Inf policy and DDP correct (the references' scheme and its problems (a)–(d):
docs/algorithms.md §8.1; this driver: docs/algorithms.md §8.2).

Usage::

    from fastgrad.optim import GaLoreAdamW, galore_param_groups, layerwise

    lw = layerwise(
        model,
        lambda m: GaLoreAdamW(galore_param_groups(m, rank=128, update_proj_gap=200, scale=0.25), lr=1e-2),
        grad_accum_steps=4,
        max_grad_norm=1.0,
    )
    for step in range(steps):
        lw.set_lr(lr_at(step))                    # once per optimizer step, for every parameter
        for micro in range(4):
            loss = model(inputs[micro], labels[micro]) / 4
            loss.backward()                       # the hooks project / accumulate as gradients arrive
        stats = lw.finish_step()                  # clip, update every parameter (or skip), return stats
        log(stats.grad_norm, stats.clip_coef, stats.skipped)
    torch.save(lw.state_dict(), "optimizer.pt")   # loads with torch.load(..., weights_only=True)

With ``streaming=True`` (and no ``max_grad_norm``) the same loop updates each parameter inside its
hook during the last micro-batch's backward; ``finish_step()`` then only publishes, counts and
reports (see "Streaming" below).

What happens (and why):

* **One optimizer, per-parameter work in hooks.** The factory is called once with
  ``model_or_params`` and must return a :class:`~fastgrad.optim.LowRankOptimizer` (GaLoreAdamW, …;
  a group without ``rank`` is plain AdamW). Its param groups keep every key (``rank``, ``scale``,
  ``lr``…), parameter indices (hence random-projector seeds) and state layout are those of the
  non-layer-wise optimizer, ``state_dict`` is interchangeable with it, and one ``set_lr`` reaches all
  parameters. A ``register_post_accumulate_grad_hook`` on each parameter takes ``p.grad`` as soon
  as it is complete, sets ``p.grad = None`` and keeps only what the update will need, so at most one
  full gradient is alive at a time (plus the buffers below).
* **Accumulation** (``grad_accum_steps`` = n backward passes per optimizer step; the loss must
  already be divided by n, as for ordinary accumulation). Backward passes are counted with an
  autograd-engine callback; no parameter steps before :meth:`finish_step` (unless streaming, below:
  then each steps in its hook of the last micro-batch).

  - low-rank parameter, no refresh due: each micro-batch's G_i is projected with the current P
    (``fastgrad.ops.lowrank_project``, through ``LowRankOptimizer.prepare`` on the first one) and
    added into a D×r' buffer (fp32 when the gradient is 16-bit), then G_i is freed. Since
    down(·, P) is linear, Σ down(G_i, P) = down(Σ G_i, P).
  - low-rank parameter, refresh due (k % update_proj_gap == 0, or no basis yet): the new subspace
    must come from the step's whole gradient (GaLore-2), so on these steps only (1 in T) the full
    gradient is accumulated; in the last micro-batch's hook the projector is refreshed from it, the
    gradient is projected and the full buffer freed. This is exact (same P as one batch of n·b) at
    the cost, on refresh steps with n > 1, of holding those full gradients across the micro-batches
    (as non-layer-wise training always does). With n = 1 nothing changes: one gradient at a time.
    A projector that needs no gradient to refresh (``random``) accumulates in low rank always.
  - full-rank parameters (embeddings, norms, head): the full gradient is accumulated and kept
    until :meth:`finish_step` (n = 1 included, see clipping). For LLaMA-like models these are a
    minority of the gradient bytes (≈12% for LLaMA-1B); it is the price of an exact global norm and
    of an all-or-nothing NaN policy.
  - an optimizer whose update reads the full gradient (``update_reads_grad = True``, e.g. Fira's
    residual) gets ``p.grad`` set to its accumulated gradient during the update: correct, but
    without the memory saving (every full gradient is kept until :meth:`finish_step`).
* **Clipping** (``max_grad_norm``): :meth:`finish_step` computes the global 2-norm of exactly what
  the optimizer consumes, ``sqrt(Σ_lowrank ‖R‖² + Σ_fullrank ‖G‖²)`` with R = down(G, P) of the
  accumulated gradient G (after a refresh, P is the new basis), and scales R and G by
  ``min(1, max_grad_norm / (norm + 1e-6))`` (``clip_grad_norm_``'s formula) before any update. For
  an orthonormal P (svd, randomized, dct) ‖R‖ is the norm of G's component in the subspace, ≤ ‖G‖;
  the full-gradient norm of ``clip_grad_norm_`` is not available without keeping the full
  gradients (‖Σ_i G_i‖ is not a function of the projected parts). The norm used is returned:
  clipping is never a silent no-op.
* **NaN/Inf**: a non-finite norm (any NaN/Inf in a consumed gradient, or a refresh from a
  non-finite G) skips the whole step for all parameters: no weight, moment or projector changes
  (refreshes done in hooks are rolled back), counted in ``optimizer.nonfinite_steps``; with the
  optimizer's ``nonfinite="raise"`` a FloatingPointError is raised instead, after the same rollback.
* **Host synchronisation**: one per step, in :meth:`finish_step` (the norm; ``fetch`` reads the
  caller's values, e.g. the loss, in the same one), streaming included; refresh steps add one per
  refreshed parameter (the finiteness of G before its refresh, besides the SVD's or QR's own), and
  ``nonfinite="raise"`` one more on a non-finite step (to name the parameters).
* **LR schedule**: :meth:`set_lr` sets the lr of every param group, read once per optimizer step
  by the updates in :meth:`finish_step`; every parameter's step counter advances once per step
  (the references ran one scheduler per parameter per micro-batch: half speed, docs/algorithms.md §8.1).
* **Distributed data parallel** (``torch.distributed`` initialized, or ``process_group`` given):
  do not wrap the model in ``DistributedDataParallel`` (rejected); the driver averages gradients
  itself, after local accumulation and before any use: in the last micro-batch's hook it
  all-reduces the low-rank buffer R (D×r', the communication saving of low-rank training) or the
  full-rank gradient asynchronously (waited for in :meth:`finish_step`), and on refresh steps the
  full gradient synchronously before the refresh, so every rank computes the same P from the global
  gradient. Parameters (and the module's buffers) are broadcast from rank 0 at construction. The
  hooks issue collectives in backward order, which is the same on all ranks for the same model;
  every rank must produce gradients for the same parameters (unused parameters are not supported:
  a mismatch hangs like any mismatched collective). Sharded (DTensor/FSDP) parameters are rejected.
* **Checkpoints**: :meth:`state_dict` (at a step boundary) holds the optimizer's state (tensors and
  ints, ``weights_only``-loadable) and the driver's step count; resume is bitwise on CPU.
* **Streaming** (``streaming=True``, opt-in): what galore-torch and Q-GaLore do. Each parameter is
  updated in its hook as soon as its accumulation is complete (the last micro-batch's hook, after
  the refresh/projection above; under a process group after its all-reduce, waited for right
  there), through the optimizer's own update, and its buffers are freed at once: at most one
  parameter's consumed gradient (R, or a full-rank G) is alive beyond what backward itself holds,
  instead of all of them until :meth:`finish_step` (for LLaMA-7B Q-GaLore at rank 1024 the held
  R's are ~6 GiB, and the full-rank gradients are not kept either). Without clipping and with
  finite gradients the result is bitwise that of ``streaming=False`` (the same per-parameter
  updates, at another time). What it trades:

  - no clipping: the global norm is known only after the last update, so ``max_grad_norm`` must be
    None (it is still reported: :meth:`finish_step` sums per-parameter squares recorded in the hooks);
  - NaN/Inf is per parameter, not all-or-nothing: a non-finite consumed gradient skips that
    parameter only (its refresh undone; weight, moments, projector unchanged; the step is counted
    once in ``nonfinite_steps``, ``grad_norm`` is NaN/Inf, ``skipped`` is True only if every
    parameter skipped); with ``nonfinite="raise"`` the hook raises FloatingPointError out of
    ``backward()``, and the parameters updated earlier in that backward pass keep their update
    (those not reached yet are not updated; the driver is reset, ready for the next step);
  - the learning rate is read during backward: call :meth:`set_lr` for step k before step k's
    last backward pass (``fastgrad.train`` sets it at the start of each step);
  - :meth:`zero_grad` in the middle of the last backward pass cannot undo the updates already made:
    it warns (RuntimeWarning) and drops only the rest;
  - no host synchronisation per parameter: each update is applied without knowing on the host
    whether its gradient was finite, and every tensor it writes (weight, state, a quantized layer's
    scales and zeros) is copied before and put back on the device with ``torch.where`` when it was
    not (a transient copy of one parameter's weight and state at a time, and about twice the
    update's memory traffic for the weight); the flags are read with the norm in
    :meth:`finish_step`, which then restores the skipped parameters' host-side state (step counts)
    and counts the step. With ``nonfinite="raise"`` each flag is read in its hook instead (one host
    synchronisation per parameter), so that the error comes before backward reaches the others.

  Use it when the held projected (and full-rank) gradients decide whether a step fits, and
  clipping is not needed (GaLore and Q-GaLore's recipes do not clip); it works with activation
  checkpointing (a block's weights are updated only after that block's backward, recomputation
  included), with projected gradients from the layers (LowRankGradLinear, QLinear), with an
  optimizer that reads the full gradient (``p.grad`` is set around its update) and under a process
  group (one synchronous all-reduce per parameter instead of overlapped ones).

* **Projected gradients from the layers** (:mod:`fastgrad.nn.lowrank`: LowRankGradLinear, QLinear):
  between refreshes the layer hands over R itself and the hook adds it into the low-rank buffer, so
  no full gradient of those weights exists at all; the projections are published after every
  step. QLinear's uint8 weights (no autograd gradient) are driven through the layer's
  grad-ready hook, which makes Q-GaLore layer-wise possible.

Not supported: reentrant activation checkpointing (nested backward passes would be counted as
micro-batches; fastgrad's models use the non-reentrant kind), ``torch.autograd.grad`` (no
post-accumulate hooks fire), sparse gradients. Streaming additionally assumes that no autograd node
still to run in the backward pass reads a weight whose gradient is complete (true of ordinary
models, weight tying included: a weight's hook fires only after all its uses' gradients).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastgrad.nn.lowrank import accepts_projected_grad, pop_projected_grad, register_grad_ready_hook
from fastgrad.ops import lowrank_project
from fastgrad.optim.base import LowRankOptimizer, ParamStep, finite_flags
from fastgrad.optim.projectors import Projector, lowrank_shape

__all__ = ["layerwise", "LayerwiseOptimizer", "StreamingLayerwiseOptimizer", "LayerwiseAsOptimizer", "StepStats"]

# Projectors whose refresh does not read the gradient: they accumulate in low rank on refresh steps too.
_GRAD_FREE_REFRESH = ("random",)


@dataclass(frozen=True)
class StepStats:
    """What :meth:`LayerwiseOptimizer.finish_step` did.

    step:      optimizer steps finished so far, this one included (skipped or not).
    grad_norm: global 2-norm of the gradients the optimizer consumes, before clipping (NaN/Inf when
               the step was skipped for a non-finite gradient; streaming: when any parameter was).
    clip_coef: the factor the gradients were multiplied by (1.0: no clipping happened).
    skipped:   True when a non-finite gradient made the step change nothing (streaming: True only
               when every parameter was skipped; a partly skipped step has a non-finite grad_norm).
    fetched:   the values of :meth:`LayerwiseOptimizer.finish_step`'s ``fetch`` tensor, read in the
               same host synchronisation as the norm.
    """

    step: int
    grad_norm: float
    clip_coef: float
    skipped: bool
    fetched: tuple[float, ...] = ()


@dataclass(eq=False)
class _Slot:
    """One parameter's accumulation within the current optimizer step."""

    param: torch.Tensor
    group: dict[str, Any]
    proj: Projector | None
    dtype: torch.dtype
    lowrank_acc: bool  # True: ``buf`` is Σ down(G_i, P); False: ``buf`` is Σ G_i
    buf: torch.Tensor | None = None
    item: ParamStep | None = None  # prepared: P chosen (refreshed if due), state initialised
    grad: torch.Tensor | None = None  # full gradient kept for an optimizer with update_reads_grad
    bad: bool = False  # a refresh met a non-finite gradient
    closed: bool = False  # the accumulation is complete (and its reduction launched)
    work: Any = None  # pending async all-reduce
    done: bool = False  # streaming: updated (or skipped) in its hook, buffers released


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _read(parts: list[torch.Tensor]) -> list[float]:
    """The values of 0-d/1-d tensors, in order, with one host synchronisation (none for no parts):
    gathered as float64 on the first part's device and read with a single ``tolist()``."""
    if not parts:
        return []
    device = parts[0].device
    return torch.cat([t.reshape(-1).to(device, torch.float64) for t in parts]).tolist()


@dataclass(eq=False)
class _Masked:
    """Streaming: an update applied before its gradient's finiteness was read on the host."""

    param: torch.Tensor
    finite: torch.Tensor  # 0-d bool on the device
    host: dict[str, Any]  # the state's non-tensor entries before the update
    keys: set[str]  # the state's keys before the update


class LayerwiseOptimizer:
    """Layer-wise stepping of one :class:`LowRankOptimizer`; build it with :func:`layerwise`.

    See the module docstring for the design. Attributes: ``optimizer`` (the wrapped optimizer),
    ``param_groups`` (its groups), ``grad_accum_steps``, ``max_grad_norm``, ``streaming``, ``steps``
    (finished optimizer steps, skipped ones included).
    """

    streaming = False  # StreamingLayerwiseOptimizer: True

    def __init__(
        self,
        optimizer: LowRankOptimizer,
        *,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        module: nn.Module | None = None,
    ) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(
                "layerwise: the factory must return a fastgrad LowRankOptimizer (e.g. GaLoreAdamW; a param "
                f"group without 'rank' is plain AdamW), got {type(optimizer).__name__}"
            )
        if not isinstance(grad_accum_steps, int) or isinstance(grad_accum_steps, bool) or grad_accum_steps < 1:
            raise ValueError(f"layerwise: grad_accum_steps must be a positive int, got {grad_accum_steps!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"layerwise: max_grad_norm must be a positive finite number or None, got {max_grad_norm}")
        self.optimizer = optimizer
        self.grad_accum_steps = grad_accum_steps
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.steps = 0
        self._reads_grad = bool(getattr(optimizer, "update_reads_grad", False))
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._index_groups()
        self._check_params(module)
        self._pg = self._resolve_group(process_group)
        self._world = 1 if self._pg is None else torch.distributed.get_world_size(self._pg)
        if self._pg is not None:
            self._broadcast_from_rank0(module)
        self._slots: dict[torch.Tensor, _Slot] = {}
        self._micro = 0  # backward passes completed in the current optimizer step
        self._queued_for: Any = None  # graph task whose end-of-backward callback is queued
        self._handles = []
        for p in self._group_of:
            p.grad = None
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
            # Gradients that fastgrad layers deliver outside autograd's accumulation: projected
            # ones (LowRankGradLinear, QLinear) and QLinear's full gradient of its uint8 weight.
            self._handles.append(register_grad_ready_hook(p, self._hook))

    # ------------------------------------------------------------------ construction checks
    def _check_params(self, module: nn.Module | None) -> None:
        for p in self._group_of:
            if not p.is_leaf or not (p.requires_grad or accepts_projected_grad(p)):
                raise ValueError(
                    "layerwise: every optimized tensor must be a leaf that requires grad (or the weight of a "
                    "fastgrad layer that delivers its gradient, such as QLinear)"
                )
            if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
                raise NotImplementedError(
                    "layerwise: sharded (DTensor / FSDP) parameters are not supported: a projector refresh "
                    "needs the whole 2-D gradient"
                )
        if module is not None:
            missing = [n for n, p in module.named_parameters() if p.requires_grad and p not in self._group_of]
            if missing:
                raise ValueError(
                    f"layerwise: trainable parameters missing from the optimizer would never be updated: "
                    f"{missing[:8]}{' …' if len(missing) > 8 else ''}"
                )

    @staticmethod
    def _resolve_group(process_group: Any) -> Any:
        dist = torch.distributed
        if process_group is not None:
            return process_group
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    @torch.no_grad()
    def _broadcast_from_rank0(self, module: nn.Module | None) -> None:
        dist = torch.distributed
        src = dist.get_global_rank(self._pg, 0)
        tensors = list(self._group_of)
        if module is not None:  # frozen parameters and buffers too
            tensors += [q for q in module.parameters() if q not in self._group_of]
            tensors += list(module.buffers())
        for t in tensors:
            dist.broadcast(t.data, src=src, group=self._pg)

    # ------------------------------------------------------------------ public API
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group to ``lr``; call it once per optimizer step
        (streaming: before the step's last backward pass, during which the updates read it). Groups
        with learning rates of their own (Muon's AdamW group) are scheduled through ``param_groups``
        instead, each ``group["lr"]`` scaled from its initial value, as ``fastgrad pretrain`` and
        torch's LR schedulers (through :class:`LayerwiseAsOptimizer`) do."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped (or raised on) for a non-finite gradient, as counted by the optimizer."""
        return self.optimizer.nonfinite_steps

    def state_bytes(self) -> int:
        """Bytes of the optimizer state (see :meth:`LowRankOptimizer.state_bytes`)."""
        return self.optimizer.state_bytes()

    def buffer_bytes(self) -> int:
        """Bytes held right now by the accumulation buffers (projected and full gradients)."""
        seen: set[int] = set()
        total = 0
        for slot in self._slots.values():
            for t in (slot.buf, slot.grad, slot.item.low if slot.item is not None else None):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients accumulated since the last :meth:`finish_step` (and undo refreshes made
        from them), e.g. after an exception in the middle of a step. A no-op at a step boundary.

        Streaming: parameters already updated in the step's last backward pass cannot be rolled
        back; they keep their update (a RuntimeWarning says how many) and only the others' gradients
        are dropped. The driver's step count does not advance."""
        opt = self.optimizer
        updated, skipped = self._settle_updates()
        for slot in self._slots.values():
            if slot.done:
                continue
            self._wait(slot)
            if slot.item is not None:
                opt.rollback(slot.item)
            pop_projected_grad(slot.param)
        self._reset()
        if updated or skipped:
            if skipped:
                opt.nonfinite_steps += 1
            opt.publish_grad_projections()  # the updated parameters' next projections
        if updated:
            warnings.warn(
                f"layerwise (streaming): zero_grad() in the middle of a step cannot undo the updates of the {updated} "
                "parameter(s) already updated during this step's last backward pass; they keep them, and only the "
                "other parameters' gradients were dropped",
                RuntimeWarning,
                stacklevel=2,
            )

    def _settle_updates(self) -> tuple[int, int]:
        """(updated, skipped) parameters of the step in progress: none before :meth:`finish_step`."""
        return 0, 0

    def remove_hooks(self) -> None:
        """Detach the driver from the parameters (the optimizer stays usable on its own)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks (during backward)
    def _count_backward(self) -> None:
        """Queue, once per backward pass, a callback that runs when the pass has finished."""
        current = getattr(torch._C, "_current_graph_task_id", lambda: 0)()
        if self._queued_for is not None and self._queued_for == current:
            return
        self._queued_for = current
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._queued_for = None
        self._micro += 1

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        g = p.grad
        low = pop_projected_grad(p) if g is None else None
        if g is None and low is None:
            return
        p.grad = None
        if self._micro >= self.grad_accum_steps:
            raise RuntimeError(
                f"layerwise: more than grad_accum_steps={self.grad_accum_steps} backward passes before finish_step()"
            )
        if g is not None and g.is_sparse:
            raise RuntimeError("layerwise: sparse gradients are not supported")
        self._count_backward()
        slot = self._slots.get(p)
        if slot is None:
            self._slots[p] = slot = self._open(p, g, low)
        else:
            self._add(slot, g, low)
        del g, low
        if self._micro == self.grad_accum_steps - 1:
            self._close(slot)
            self._accumulated(slot)

    def _accumulated(self, slot: _Slot) -> None:
        """``slot``'s gradient for this step is complete (its last micro-batch's hook): the
        deferred driver keeps it until :meth:`finish_step`; the streaming one updates now."""

    def _open(self, p: torch.Tensor, g: torch.Tensor | None, low: torch.Tensor | None) -> _Slot:
        """First gradient of ``p`` in this optimizer step (the full ``g``, or ``low`` projected by
        the layer): choose low-rank or full accumulation."""
        opt = self.optimizer
        group = self._group_of[p]
        proj = opt.projector(group) if "rank" in group else None
        state = opt.state[p]
        lowrank_acc = False
        if proj is not None and not self._reads_grad:
            # The optimizer's own rule (Q-GaLore's interval T adapts per weight).
            due = not state or not proj.has_basis(state) or opt.refresh_due(group, state)
            lowrank_acc = not due or proj.name in _GRAD_FREE_REFRESH
        if low is not None and not lowrank_acc:
            raise RuntimeError(
                f"layerwise: parameter {tuple(p.shape)} received a projected gradient at a step that refreshes "
                "its subspace (the projection was not published by this optimizer?)"
            )
        slot = _Slot(p, group, proj, (g if g is not None else low).dtype, lowrank_acc)
        if not lowrank_acc:
            slot.buf = g
            return slot
        # Projects G (after refreshing a gradient-free projector when due), initialising the state;
        # a projected gradient from the layer is taken as it is.
        item = opt.prepare(group, p, proj, grad=g, low=low)
        slot.item = item
        if item.low is None:  # a due refresh met a non-finite gradient
            slot.bad = True
            # A NaN placeholder keeps the all-reduces of all ranks matched (and makes every rank skip).
            shape = lowrank_shape(p.shape, state["proj_side"], state["proj_rank"])
            slot.buf = torch.full(shape, math.nan, dtype=torch.float32, device=g.device)
            return slot
        low, item.low = item.low, None
        if (self.grad_accum_steps > 1 or self._pg is not None) and _is_16bit(low.dtype):
            low = low.float()  # accumulate / all-reduce the small projected gradient in fp32
        slot.buf = low
        return slot

    def _add(self, slot: _Slot, g: torch.Tensor | None, low: torch.Tensor | None) -> None:
        if slot.closed:
            raise RuntimeError(
                "layerwise: a gradient arrived after its accumulation was closed"
                + (" (streaming: the parameter was already updated)" if slot.done else "")
            )
        if slot.bad:
            return
        if slot.lowrank_acc:
            if low is None:
                low = lowrank_project(g, self.optimizer.proj_matrix(slot.item), slot.item.side)
            slot.buf.add_(low)
        elif low is not None:
            raise RuntimeError(f"layerwise: parameter {tuple(slot.param.shape)} mixed projected and full gradients")
        else:
            slot.buf.add_(g)

    def _close(self, slot: _Slot) -> None:
        """The accumulation of ``slot`` is complete: reduce it across ranks, refresh and project if due."""
        slot.closed = True
        refresh = slot.proj is not None and not slot.lowrank_acc
        if self._pg is not None:
            slot.work = torch.distributed.all_reduce(slot.buf, group=self._pg, async_op=True)
            if refresh:  # the refresh needs the global gradient now
                self._wait(slot)
        if refresh:  # the full accumulated gradient: refresh P from it (if due), project, free it
            item = self.optimizer.prepare(slot.group, slot.param, slot.proj, grad=slot.buf)
            slot.item = item
            if self._reads_grad:
                slot.grad = slot.buf
            slot.buf = None
            if item.low is None:
                slot.bad = True

    def _wait(self, slot: _Slot) -> None:
        if slot.work is not None:
            slot.work.wait()
            slot.work = None
            if slot.buf is not None and self._world > 1:
                slot.buf.div_(self._world)

    def _finalize(self, slot: _Slot) -> ParamStep | None:
        """The prepared step of ``slot`` (None if it met a non-finite gradient)."""
        if not slot.closed:
            self._close(slot)
        self._wait(slot)
        if slot.bad:
            return None
        if slot.lowrank_acc:
            slot.item.low = slot.buf.to(slot.dtype)
        elif slot.proj is None:
            slot.item = self.optimizer.prepare(slot.group, slot.param, None, grad=slot.buf)
            if self._reads_grad:
                slot.grad = slot.buf
        slot.buf = None
        return slot.item

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def finish_step(self, fetch: torch.Tensor | None = None) -> StepStats:
        """Complete the optimizer step: global norm, clipping, NaN/Inf policy, every parameter's update.

        Must follow exactly ``grad_accum_steps`` backward passes since the previous call.
        Streaming: the parameters were updated in their hooks; this reads which gradients were
        finite (restoring the host-side state of the skipped parameters), publishes the next step's
        projections, advances the step count, and returns the norm of the consumed gradients with
        clip_coef 1. Either way the norm (and streaming's flags) are read with one host
        synchronisation, in which ``fetch`` (a 0-d or 1-d tensor, e.g. the step's loss) is read
        too: its values are ``StepStats.fetched``.
        """
        if self._micro != self.grad_accum_steps:
            raise RuntimeError(
                f"layerwise: finish_step() after {self._micro} backward pass(es), expected "
                f"grad_accum_steps={self.grad_accum_steps} (call zero_grad() to drop a partial step)"
            )
        return self._finish(fetch)

    def _finish(self, fetch: torch.Tensor | None) -> StepStats:
        """Deferred: every consumed gradient's norm, clipping, the NaN/Inf policy, then the updates."""
        opt = self.optimizer
        slots = sorted(self._slots.values(), key=lambda s: opt.index_of(s.param))
        items = [self._finalize(s) for s in slots]
        good = [it for it in items if it is not None]
        # A refresh that met a non-finite gradient left no projected gradient: the norm is NaN then.
        complete = len(good) == len(items)
        squares = self._squares(self._norms_of([it.low for it in good])) if complete else []
        values = _read(squares + ([fetch] if fetch is not None else []))
        norm = math.sqrt(sum(values[: len(squares)])) if complete else math.nan
        fetched = tuple(values[len(squares) :])
        self.steps += 1
        if not math.isfinite(norm):
            return self._skip(slots, items, norm, fetched)
        coef = 1.0
        if self.max_grad_norm is not None:
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        if coef < 1.0:
            scaled = {id(it.low): it.low for it in good}
            scaled.update({id(s.grad): s.grad for s in slots if s.grad is not None})
            torch._foreach_mul_(list(scaled.values()), coef)
        for s in slots:
            if s.grad is not None:
                s.param.grad = s.grad
        by_group: dict[int, list[ParamStep]] = {}
        for it in good:
            by_group.setdefault(id(it.group), []).append(it)
        try:
            for group_items in by_group.values():
                opt.update_group(group_items[0].group, group_items)
        finally:
            for s in slots:
                s.param.grad = None
            self._reset()
            opt.publish_grad_projections()
        return StepStats(self.steps, norm, coef, False, fetched)

    def _skip(
        self, slots: list[_Slot], items: list[ParamStep | None], norm: float, fetched: tuple[float, ...]
    ) -> StepStats:
        opt = self.optimizer
        bad: list[_Slot] = []
        if opt.nonfinite == "raise":  # a second host synchronisation, only to name the parameters
            finite = iter(finite_flags([it.low for it in items if it is not None]))
            bad = [s for s, it in zip(slots, items, strict=True) if it is None or not next(finite)]
        for s in slots:
            if s.item is not None:
                opt.rollback(s.item)
        self._reset()
        opt.publish_grad_projections()
        opt.nonfinite_steps += 1
        if opt.nonfinite == "raise":
            where = ", ".join(f"#{opt.index_of(s.param)} {tuple(s.param.shape)}" for s in bad) or "(norm overflow)"
            raise FloatingPointError(
                f"layerwise {type(opt).__name__}: non-finite gradient in parameter(s) {where}; "
                "no weight, moment or projector was changed"
            )
        return StepStats(self.steps, norm, 1.0, True, fetched)

    @staticmethod
    def _norms_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The fp32 2-norm of each tensor (0-d, on its device; NaN/Inf if any entry is)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        return [n for ts in by_device.values() for n in torch._foreach_norm(ts, 2, dtype=torch.float32)]

    @staticmethod
    def _squares(norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Σ n² of 0-d fp32 norms, per device (0-d fp32 there), without a host synchronisation: the
        caller reads them (:func:`_read`) and takes the global norm as sqrt of their sum."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for n in norms:
            by_device.setdefault(n.device, []).append(n)
        return [torch.linalg.vector_norm(torch.stack(ns)).square() for ns in by_device.values()]

    def _reset(self) -> None:
        self._slots = {}
        self._micro = 0
        self._queued_for = None

    # ------------------------------------------------------------------ checkpoints
    def _check_boundary(self, what: str) -> None:
        if self._slots or self._micro:
            raise RuntimeError(f"layerwise: {what} only at a step boundary (after finish_step() or zero_grad())")

    def _index_groups(self) -> None:
        """Map each parameter to its param-group dict. Rebuilt after load_state_dict, which replaces
        the optimizer's group dicts: a stale map would keep reading the old learning rate."""
        self._group_of.clear()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in self._group_of:
                    raise ValueError("layerwise: a parameter appears twice in the optimizer's param groups")
                self._group_of[p] = group

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict and the driver's counters; ``torch.load(..., weights_only=True)`` reads it."""
        self._check_boundary("state_dict()")
        return {
            "optimizer": self.optimizer.state_dict(),
            "layerwise": {
                "steps": self.steps,
                "grad_accum_steps": self.grad_accum_steps,
                "max_grad_norm": self.max_grad_norm,
                "streaming": self.streaming,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (grad_accum_steps, max_grad_norm and streaming stay as
        constructed: a state saved with or without streaming loads into either)."""
        self._check_boundary("load_state_dict()")
        if "optimizer" not in state_dict or "layerwise" not in state_dict:
            raise ValueError(
                "layerwise.load_state_dict: expected the dict of LayerwiseOptimizer.state_dict() "
                "(keys 'optimizer' and 'layerwise'); for a plain optimizer state use .optimizer.load_state_dict()"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._index_groups()
        self.steps = int(state_dict["layerwise"]["steps"])


class StreamingLayerwiseOptimizer(LayerwiseOptimizer):
    """Layer-wise stepping that updates each parameter inside its hook during the last backward
    pass and frees its buffers at once (``layerwise(..., streaming=True)``; module docstring,
    "Streaming"). It cannot clip (``max_grad_norm`` must be None), and NaN/Inf is per parameter."""

    streaming = True

    def __init__(self, optimizer: LowRankOptimizer, **kwargs: Any) -> None:
        if kwargs.get("max_grad_norm") is not None:
            raise ValueError(
                f"layerwise: streaming=True cannot clip (max_grad_norm={kwargs['max_grad_norm']}): each parameter is "
                "updated during backward, and the global gradient norm is known only after the last update; use "
                "streaming=False for clipping, or max_grad_norm=None with streaming"
            )
        # Within the current step: (parameter index, its consumed gradient's 2-norm, a 0-d fp32
        # tensor on its device) per parameter, the updates whose finiteness is not read yet, and
        # how many were updated / skipped (the pending ones count as updated until read).
        self._norms: list[tuple[int, torch.Tensor]] = []
        self._masked: list[_Masked] = []
        self._updated = 0
        self._skipped = 0
        super().__init__(optimizer, **kwargs)

    def _accumulated(self, slot: _Slot) -> None:
        self._stream(slot)

    def _settle_updates(self) -> tuple[int, int]:
        """Read the pending masked updates' flags; (updated, skipped) parameters of this step."""
        self._resolve_masked(_read(self._masked_flags()))
        return self._updated, self._skipped

    def _reset(self) -> None:
        super()._reset()
        self._norms = []
        self._masked = []
        self._updated = self._skipped = 0

    def _stream(self, slot: _Slot) -> None:
        """Streaming: update ``slot``'s parameter now (its accumulation is complete) through the
        optimizer's own update, or skip it if its consumed gradient is non-finite; free its buffers.
        The skip is decided on the device (:meth:`_update_masked`), except when a refresh already
        found G non-finite (on the host) and under ``nonfinite="raise"``."""
        opt = self.optimizer
        item = self._finalize(slot)  # waits for the all-reduce; None if a refresh met a non-finite G
        slot.done = True
        index = opt.index_of(slot.param)
        if item is None:
            self._norms.append((index, torch.full((), math.nan, dtype=torch.float32, device=slot.param.device)))
            self._skip_streamed(slot)
            return
        self._norms.append((index, torch._foreach_norm([item.low], 2, dtype=torch.float32)[0]))
        # max|x| decides, not the 2-norm: an overflowing norm of finite entries is not a skip (it is
        # reported as Inf), as in LowRankOptimizer.step.
        finite = torch.isfinite(torch._foreach_norm([item.low], math.inf)[0])
        if opt.nonfinite != "raise":
            self._update_masked(slot, item, finite)
        elif bool(finite):  # raise: read now (one host sync per parameter), to stop before backward goes on
            self._update(slot, item)
        else:
            self._skip_streamed(slot)

    def _skip_streamed(self, slot: _Slot) -> None:
        """Streaming: leave ``slot``'s parameter as it was (undo its refresh); raise if the policy says so."""
        if slot.item is not None:
            self.optimizer.rollback(slot.item)
        self._release(slot)
        self._skipped += 1
        if self.optimizer.nonfinite == "raise":
            self._abort(slot)

    def _update(self, slot: _Slot, item: ParamStep) -> None:
        """Streaming: the optimizer's update of ``slot``'s parameter; frees its buffers."""
        if slot.grad is not None:  # update_reads_grad: the accumulated full gradient
            slot.param.grad = slot.grad
        self._updated += 1
        try:
            self.optimizer.update_group(slot.group, [item])
        finally:
            slot.param.grad = None
            self._release(slot)

    def _update_masked(self, slot: _Slot, item: ParamStep, finite: torch.Tensor) -> None:
        """Streaming: :meth:`_update`, kept only where ``finite`` (a 0-d device bool, not read here)
        holds. Every tensor the update writes (the weight and what :meth:`update_writes` adds, the
        state's tensors but the projector's, which only a refresh writes) is copied first and put
        back on the device when the gradient was not finite; the host-side state is restored by
        :meth:`_resolve_masked` once ``finite`` is read with the step's norm."""
        state = item.state
        projector = slot.proj.refresh_keys if slot.proj is not None else ()
        outside = self.optimizer.update_writes(item)
        saved_outside = [t.clone() for t in outside]
        saved_state = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and k not in projector}
        host = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        masked = _Masked(slot.param, finite, host, set(state))
        self._update(slot, item)
        for t, old in zip(outside, saved_outside, strict=True):
            torch.where(finite, t, old, out=t)
        for key, old in saved_state.items():  # in place, also into a tensor the update replaced
            torch.where(finite, state[key], old, out=state[key])
        self._masked.append(masked)

    def _masked_flags(self) -> list[torch.Tensor]:
        """The finiteness flags of the pending masked updates, stacked (for :func:`_read`)."""
        if not self._masked:
            return []
        device = self._masked[0].finite.device
        return [torch.stack([m.finite.to(device) for m in self._masked])]

    def _resolve_masked(self, flags: list[float]) -> None:
        """Given the masked updates' flags (read on the host), restore the host-side state (step
        counts, keys the update added) of those whose gradient was not finite and count them as
        skipped; their tensors were put back already."""
        for m, ok in zip(self._masked, flags, strict=True):
            if ok:
                continue
            state = self.optimizer.state[m.param]
            for key in [k for k in state if k not in m.keys]:
                del state[key]
            state.update(m.host)
            self._updated -= 1
            self._skipped += 1
        self._masked = []

    @staticmethod
    def _release(slot: _Slot) -> None:
        slot.buf = slot.grad = slot.item = None

    def _abort(self, bad: _Slot) -> None:
        """Streaming, ``nonfinite="raise"``: drop what is pending, reset, raise FloatingPointError."""
        opt = self.optimizer
        pending = 0
        for slot in self._slots.values():
            if slot.done:
                continue
            pending += 1
            self._wait(slot)
            if slot.item is not None:
                opt.rollback(slot.item)
            pop_projected_grad(slot.param)
        updated = self._updated
        self.steps += 1
        opt.nonfinite_steps += 1
        self._reset()
        opt.publish_grad_projections()
        raise FloatingPointError(
            f"layerwise {type(opt).__name__} (streaming): non-finite gradient in parameter "
            f"#{opt.index_of(bad.param)} {tuple(bad.param.shape)}, which was not changed; streaming is not "
            f"all-or-nothing: the {updated} parameter(s) updated earlier in this step keep their update, the "
            f"{pending} with a pending accumulation and those not reached by backward yet are not updated"
        )

    def _finish(self, fetch: torch.Tensor | None) -> StepStats:
        opt = self.optimizer
        # A parameter without a gradient in the last micro-batch was not closed by a hook: now.
        for slot in sorted((s for s in self._slots.values() if not s.done), key=lambda s: opt.index_of(s.param)):
            self._stream(slot)
        self.steps += 1
        self._norms.sort(key=lambda t: t[0])
        # One host synchronisation: the norm, every masked update's finiteness and ``fetch``.
        squares = self._squares([n for _, n in self._norms])
        flags_end = len(squares) + len(self._masked)
        values = _read(squares + self._masked_flags() + ([fetch] if fetch is not None else []))
        norm = math.sqrt(sum(values[: len(squares)]))
        self._resolve_masked(values[len(squares) : flags_end])
        fetched = tuple(values[flags_end:])
        count, skipped = len(self._slots), self._skipped
        if skipped:
            opt.nonfinite_steps += 1
        self._reset()
        opt.publish_grad_projections()
        return StepStats(self.steps, norm, 1.0, count > 0 and skipped == count, fetched)


class LayerwiseAsOptimizer(torch.optim.Optimizer):
    """A layer-wise driver seen as a ``torch.optim.Optimizer``, for training loops that call
    ``optimizer.step()`` and ``zero_grad()`` after backward and schedule the learning rate through
    ``param_groups`` (``transformers.Trainer``, Lightning, ``torch.optim.lr_scheduler``).

    ``step()`` is the driver's :meth:`~LayerwiseOptimizer.finish_step` (the loop must run
    ``driver.grad_accum_steps`` backward passes per step, as its own gradient accumulation does);
    ``zero_grad()`` is the driver's (a no-op at a step boundary, since the driver has consumed the
    gradients); ``param_groups`` and ``state`` are the wrapped optimizer's own objects, so a
    scheduler's learning rate reaches every parameter; ``state_dict`` is the driver's. The loop
    must not clip ``p.grad`` itself (the driver consumed it): pass ``max_grad_norm`` to
    :func:`layerwise` instead. The last :class:`StepStats` is ``last_stats``.
    """

    def __init__(self, driver: LayerwiseOptimizer) -> None:
        if not isinstance(driver, LayerwiseOptimizer):
            raise TypeError(f"LayerwiseAsOptimizer: expected a layerwise(...) driver, got {type(driver).__name__}")
        params = [p for group in driver.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.driver = driver
        self.param_groups = driver.param_groups  # the very dicts the driver's updates read
        self.state = driver.optimizer.state
        self.last_stats: StepStats | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("LayerwiseAsOptimizer.step: closures are not supported (backward runs before step)")
        self.last_stats = self.driver.finish_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.driver.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)
        self.param_groups = self.driver.param_groups
        self.state = self.driver.optimizer.state


def layerwise(
    model_or_params: nn.Module | Iterable,
    optimizer_factory: Callable[[Any], LowRankOptimizer] | LowRankOptimizer,
    *,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = None,
    process_group: Any = None,
    streaming: bool = False,
) -> LayerwiseOptimizer:
    """Layer-wise stepping for the optimizer that ``optimizer_factory(model_or_params)`` returns.

    ``model_or_params``: an ``nn.Module`` (every trainable parameter must then be in the optimizer,
    so none is silently never updated, docs/algorithms.md §3.5 QG-8) or an iterable of parameters or
    param groups; it is passed to the factory as is. ``optimizer_factory`` may also be an already
    built optimizer. ``grad_accum_steps``: backward passes per optimizer step. ``max_grad_norm``:
    clip the global norm of the consumed gradients (None: no clipping; the norm is still reported).
    ``process_group``: for data parallelism (default: the world group when torch.distributed is
    initialized). ``streaming``: update each parameter in its hook during the last backward pass
    and free its buffers at once (needs ``max_grad_norm=None``; NaN/Inf is then per parameter).
    See the module docstring for the design and an example.
    """
    module = model_or_params if isinstance(model_or_params, nn.Module) else None
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "layerwise: do not wrap the model in DistributedDataParallel: the layer-wise driver averages the "
            "gradients itself (low-rank ones in low rank); pass the plain module with torch.distributed initialized"
        )
    if not isinstance(model_or_params, nn.Module):
        model_or_params = list(model_or_params)
    if isinstance(optimizer_factory, torch.optim.Optimizer):
        optimizer = optimizer_factory
    else:
        optimizer = optimizer_factory(model_or_params)
    if not isinstance(streaming, bool):
        raise TypeError(f"layerwise: streaming must be a bool, got {streaming!r}")
    driver = StreamingLayerwiseOptimizer if streaming else LayerwiseOptimizer
    return driver(
        optimizer, grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm, process_group=process_group,
        module=module,
    )  # fmt: skip
