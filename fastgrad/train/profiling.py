"""Measured memory, for the tests and benchmarks that hold fastgrad to its memory model and its
memory claims: the CPU allocator's events under ``torch.profiler``, their live peak, and the bytes a
set of tensors keeps resident."""

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
