"""Measured memory and communication, for the tests and benchmarks that hold fastgrad to its
memory model and its claims: the CPU allocator's events under ``torch.profiler``, their live peak,
the bytes a set of tensors keeps resident, and the bytes of the collectives a step issues."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable


def measured_memory_events(fn: Callable[[], object]) -> list[int]:
    """Run ``fn`` under ``torch.profiler`` and return the CPU allocator's memory events in time
    order: +bytes for each allocation, −bytes for each free."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return [e.nbytes() for e in events]


def storage_bytes(tensors: Iterable) -> int:
    """Bytes of the storages behind ``tensors`` (torch tensors), each storage counted once (views
    share one): what a set of tensors keeps resident."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def live_peak(events: Iterable[int]) -> int:
    """The largest running total of ``events``: the peak of bytes live above the start (≥ 0)."""
    return max(itertools.accumulate(events, initial=0))


class CollectiveBytes:
    """Counts the collectives this process issues while active (a ``with`` block), and their bytes,
    by kind: what a step sends is measured, not estimated. Catches the process-group ops
    (``torch.distributed``'s all-gather, reduce-scatter, all-reduce, broadcast, which FSDP2 uses) and
    the functional ones (DTensor's ``full_tensor``). The bytes of a collective are those of the whole
    tensor it forms or reduces: an all-gather's output, a reduce-scatter's input, an all-reduce's or
    broadcast's tensor.

    ``bytes``: kind -> bytes; ``calls``: kind -> count (kinds: all_gather, reduce_scatter,
    all_reduce, broadcast)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counted = _collective_bytes(str(func.overloadpacket), args)
                if counted is not None:
                    kind, nbytes = counted
                    counter.bytes[kind] = counter.bytes.get(kind, 0) + nbytes
                    counter.calls[kind] = counter.calls.get(kind, 0) + 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> CollectiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _collective_bytes(op: str, args: tuple) -> tuple[str, int] | None:
    """(kind, bytes) of a collective op call, None for any other op."""
    if op == "c10d._allgather_base_":  # (output, input, ...)
        return "all_gather", _nbytes(args[0])
    if op == "_c10d_functional.all_gather_into_tensor":  # (input, group_size, group_name)
        return "all_gather", _nbytes(args[0]) * args[1]
    if op == "c10d._reduce_scatter_base_":  # (output, input, ...)
        return "reduce_scatter", _nbytes(args[1])
    if op == "c10d.allreduce_":  # (tensors, ...)
        return "all_reduce", sum(_nbytes(t) for t in args[0])
    if op == "c10d.broadcast_":  # (tensors, ...)
        return "broadcast", sum(_nbytes(t) for t in args[0])
    if op.startswith(("c10d.", "_c10d_functional.")) and op.rsplit(".", 1)[1] not in _NOT_COLLECTIVES:
        raise NotImplementedError(f"CollectiveBytes: no byte count for {op}")
    return None


# Ops of those namespaces that move no data of their own.
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier")
