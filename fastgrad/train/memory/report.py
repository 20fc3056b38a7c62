"""The report ``fastgrad memory`` prints."""

from __future__ import annotations

from fastgrad.train.memory.figures import anchors_for
from fastgrad.train.memory.model import MemoryBreakdown, format_bytes

# ------------------------------------------------------------------------------------------------
# the report of ``fastgrad memory``
# ------------------------------------------------------------------------------------------------


def format_report(b: MemoryBreakdown, notes: tuple[str, ...] = ()) -> str:
    """The table ``fastgrad memory`` prints: the categories, their sum, the estimated peak (by phase),
    and beside it the published figures for this model and optimizer."""
    c = b.config
    what = [f"llama-{c['model']} ({c['parameters'] / 1e9:.2f}B parameters)", c["optim"]]
    if c["rank"] is not None:
        what[-1] += f" rank {c['rank']}"
    what += (["layer-wise (streaming)"] if c.get("layerwise_streaming") else ["layer-wise"]) if c["layerwise"] else []
    what += ["activation checkpointing"] if c["activation_checkpointing"] else []
    accum = f" × {c['grad_accum']} micro-batches" if c["grad_accum"] > 1 else ""
    what += [f"batch {c['batch_size']} × seq {c['seq_len']}{accum}", c["dtype"], f"vocabulary {c['vocab_size']}"]
    what += [f"device {c['device']}"]
    if c.get("fsdp"):
        mixed = f", compute in {c['mixed_precision']}" if c.get("mixed_precision") else ""
        what += [f"FSDP2 over {c['fsdp']} processes (one process's memory{mixed})"]
    lines = ["memory of one training step: " + ", ".join(what), ""]
    rows = [(name, format_bytes(v)) for name, v in b.rows()]
    rows += [("total (sum)", format_bytes(b.total))]
    rows += [(f"estimated peak ({b.peak_phase})", format_bytes(b.peak))]
    if b.peak_between_refreshes != b.peak:
        rows += [("peak between projector refreshes", format_bytes(b.peak_between_refreshes))]
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines += [f"| {'category':<{width}} | {'bytes':>{vwidth}} |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|"]
    lines += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
    lines += ["", "peak by phase: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in b.phases.items())]
    if b.sharding:
        lines += ["", f"FSDP2, rank 0 of {b.sharding['processes']} (it holds the most rows of every weight):", ""]
        table = [(k, format_bytes(v)) for k, v in b.sharding.items() if k != "processes"]
        width, vwidth = max(len(k) for k, _ in table), max(len(v) for _, v in table)
        lines += [f"| {'':<{width}} | {'bytes':>{vwidth}} |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|"]
        lines += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in table]
    anchors = [] if b.sharding else anchors_for(c["model"], c["optim"])  # the papers' are one device's
    if b.sharding:
        lines += ["", "published figures are one device's: not shown under --fsdp"]
    elif anchors:
        lines += ["", "published figures (as quoted in docs/algorithms.md §9; GB as printed; ours in GB = 1e9 bytes):"]
        lines += [""]
        table = [("method", "figure", "what", "setting", "source", "this estimate")]
        for a in anchors:
            ours = a.ours(b) / 1e9
            table.append((a.method, f"{a.figure} GB", a.quantity, a.setting, a.source, f"{ours:.2f} GB"))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for i, row in enumerate(table):
            lines.append("| " + " | ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)) + " |")
            if i == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    else:
        lines += ["", f"no published figure for llama-{c['model']} with {c['optim']} in docs/algorithms.md §9"]
    all_notes = list(b.notes) + list(notes)
    if all_notes:
        lines += [""] + [f"note: {n}" for n in all_notes]
    return "\n".join(lines)
