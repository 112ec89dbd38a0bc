"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import json
import sys


def add_storage_option(p) -> None:
    p.add_argument("--storage", default=None,
                   help="SQLite file or SQLAlchemy URL for profiles and studies "
                        "(default: $EMPAS_STORAGE or ./empas.db)")


def add_model_options(p) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--granularity", choices=["block", "linear"], default="block",
                   help="one gene per decoder block or per linear layer (default: block)")
    p.add_argument("--bits", default="2,4,8,16", help="comma-separated bit-widths, 2-8 or 16 (default: 2,4,8,16)")
    p.add_argument("--metric", choices=["kl", "fisher"], default="kl",
                   help="sensitivity metric: measured KL (default) or the fast Fisher estimate")
    p.add_argument("--group-size", type=int, default=64, help="quantiser group size in input columns (default 64)")
    p.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--heldout-tokens", type=int, default=512, help="held-out tokens (default 512)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--text", default=None, help="plain-text file for calibration/held-out (default: built-in corpus)")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, allow_nan=False, default=_json_default)
    sys.stdout.write("\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


class ProgressBar:
    """A one-line progress bar on stderr for headless runs (no dependency, safe in pipes)."""

    def __init__(self, label: str, enabled: bool = True, stream=None):
        stream = stream or sys.stderr
        self.label, self.enabled, self.stream = label, enabled and stream.isatty(), stream
        self._last = -1.0

    def update(self, done: int, total: int, suffix: str = "", eta: float | None = None) -> None:
        if not self.enabled or total <= 0:
            return
        frac = done / total
        if frac - self._last < 0.005 and done != total:
            return
        self._last = frac
        width = 30
        filled = int(width * frac)
        eta_text = f" ETA {eta:5.0f}s" if eta is not None else ""
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{eta_text} {suffix[:30]:30}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
