"""Validation results as tables: terminal, Markdown and CSV (the CLI prints them, export writes them)."""

from __future__ import annotations

import math
from typing import Sequence

from .evaluation import ValidationResult

TABLE_COLUMNS = ("genome", "kind", "avg bits", "weights MiB (memory model)", "PPL", "ΔPPL %", "KL to dense",
                 "predicted PPL")


def table_rows(result: ValidationResult) -> list[list[str]]:
    """Rows as display strings, in :data:`TABLE_COLUMNS` order. Nothing here is a throughput: none is
    measured."""
    out = []
    for r in result.rows:
        out.append([r.name, r.kind, f"{r.average_bits:.2f}", f"{r.memory_mib:.1f}", _num(r.ppl),
                    _signed(r.delta_ppl_pct), f"{r.kl:.4f}",
                    "" if r.predicted_ppl is None else f"{_num(r.predicted_ppl)} (pred.)"])
    return out


def table_notes(result: ValidationResult, extra: Sequence[str] = ()) -> list[str]:
    notes = [f"measured on {result.heldout_tokens} held-out tokens ({result.tokens_source or 'held-out set'}); "
             f"dense PPL {_num(result.dense_ppl)}",
             f"quantiser: {result.quantizer.get('name', 'rtn')} group {result.quantizer.get('group_size')}; "
             "memory: the memory model (bit-packed codes + fp16 scale/zero per group; non-quantised "
             "parameters at 16 bits), not a measured file size",
             "predicted PPL: the additive proxy on calibration tokens (a prediction, not a measurement)"]
    if result.fidelity:
        f = result.fidelity
        notes.append(f"proxy vs measured loss over {f['points']} predicted genomes: Spearman {_corr(f['spearman'])}, "
                     f"Pearson {_corr(f['pearson'])}")
    return notes + list(extra)


def render_terminal(result: ValidationResult, notes: Sequence[str] = ()) -> str:
    rows = table_rows(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(TABLE_COLUMNS)]
    numeric = [False, False] + [True] * (len(TABLE_COLUMNS) - 2)

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(TABLE_COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out += [""] + [f"* {n}" for n in table_notes(result, notes)]
    return "\n".join(out) + "\n"


def render_markdown(result: ValidationResult, notes: Sequence[str] = ()) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(TABLE_COLUMNS) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(TABLE_COLUMNS) - 2)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in table_rows(result)]
    out += [""] + [f"- {n}" for n in table_notes(result, notes)]
    return "\n".join(out) + "\n"


CSV_FIELDS = ("name", "kind", "average_bits", "memory_bytes", "memory_mib", "memory_basis", "loss", "ppl",
              "delta_ppl_pct", "kl", "predicted_loss", "predicted_ppl", "heldout_tokens", "note")


def render_csv(result: ValidationResult) -> str:
    """One row per genome with raw numbers (predicted_* empty where nothing was predicted)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        d = r.to_dict()
        d["heldout_tokens"] = result.heldout_tokens
        writer.writerow({k: ("" if d.get(k) is None else d.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _signed(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.1f}" if abs(x) < 1e5 else f"{x:+.3g}"


def _corr(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
