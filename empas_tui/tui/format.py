"""How the TUI writes numbers, durations, errors and genomes: one place, so every screen says it alike.

Pure functions over plain values and engine objects (profiles, front points); no Textual here.
"""

from __future__ import annotations

import math
import time

from rich.text import Text

MIB = 1024 * 1024


def fmt_seconds(s: float | None) -> str:
    """3s, 4m05s, 1h02m; '-' when unknown."""
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def one_line(exc: BaseException) -> str:
    """An error as the one line a user reads (the engine's messages name the fix on their first line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ago(ts) -> str:
    """'5m ago' from a UNIX time or an ISO timestamp (local time), '-' if unknown."""
    if not ts:
        return "-"
    if isinstance(ts, str):
        try:
            from datetime import datetime

            ts = datetime.fromisoformat(ts).timestamp()
        except ValueError:
            return ts
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def number(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}" if abs(x) < 1e4 else f"{x:.3g}"


def percent(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.1f}%" if abs(x) < 1e5 else f"{x:+.3g}%"


def rise_text(delta_loss: float) -> str:
    """PPL change over dense: '+3.2%' when small, 'x41' when the genome ruins the model."""
    ratio = math.exp(min(delta_loss, 700.0))
    return f"{100.0 * (ratio - 1):+.1f}%" if ratio < 10 else f"x{ratio:.3g}"


def fit_parts(parts: list[tuple[int, str]], width: int, sep: str = "  ") -> str:
    """Join markup ``parts`` (priority, text) in their order, leaving out the least important
    (highest priority number) until the line fits ``width`` cells: a status line never ends cut."""
    keep = list(parts)

    def cells(items) -> int:
        return Text.from_markup(sep.join(t for _, t in items)).cell_len

    while len(keep) > 1 and cells(keep) > width:
        worst = max(range(len(keep)), key=lambda i: (keep[i][0], i))
        keep.pop(worst)
    return sep.join(t for _, t in keep)


def took_text(profile) -> str:
    return profile.timing_text(fmt_seconds)


def point_summary(point, profile) -> str:
    """One front point in one line: trial, memory, average bits, predicted (and measured) loss."""
    text = (f"trial {point.trial_number}  {point.memory_bytes / MIB:.2f} MiB  avg {point.average_bits or 0:.2f} bits  "
            f"pred. loss {point.predicted_loss:.4f} (PPL {math.exp(min(point.predicted_loss, 700)):.4g}, "
            f"{rise_text(point.predicted_loss - profile.base_loss)})")
    if point.measured and point.measured.get("loss") is not None:
        text += f"  measured loss {point.measured['loss']:.4f}"
    return text


def layer_rows(profile, qtypes: list[str]) -> list[tuple]:
    """(index, gene, block, qtype, params, predicted KL of that gene at its qtype) per gene."""
    idx = profile.qtype_index(qtypes)
    return [(i, profile.gene_names[i], profile.gene_blocks[i], str(qtypes[i]), int(profile.gene_params[i]),
             float(profile.sensitivity[i, idx[i]])) for i in range(profile.n_genes)]
