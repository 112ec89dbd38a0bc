"""Everything an export job is told (which archetypes, under which budget, in which format), with its
defaults and validators, in one place: the CLI's ``empas export`` flags and the TUI's archetypes
screen build an :class:`ExportSettings`, the job layer and :mod:`search.archetypes` take it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .archetypes import ARCHETYPES, BASES, DEFAULT_PPL_RISE_CAP
from .settings import SearchError

ARCHETYPE_CHOICES = ("all",) + ARCHETYPES
FORMATS = ("json", "gguf")
DEFAULT_HELDOUT_TOKENS = 2048
DEFAULT_VALIDATE_POINTS = 8
MIB = 1024 * 1024


@dataclass(frozen=True)
class ExportSettings:
    study: str
    output: str
    archetype: str = "all"  # one of ARCHETYPE_CHOICES
    max_mib: float | None = None  # only genomes of at most this many MiB (the file's, for GGUF)
    max_ppl_rise: float | None = None  # percent; also max-compression's cap (default 25)
    basis: str = "auto"  # "auto" | "mixed" | "predicted"
    format: str | None = None  # artifact JSON always; "gguf" adds DIR/<archetype>.gguf (default for ggml studies)
    validate: bool = False  # measure each archetype on held-out text
    validate_points: int = DEFAULT_VALIDATE_POINTS
    refine: int | None = None  # front points near each budget measured on calibration text (None: auto)
    model: str | None = None
    heldout_tokens: int = DEFAULT_HELDOUT_TOKENS
    seq_len: int = 128
    text_file: str | None = None

    def validate_settings(self) -> "ExportSettings":
        if not self.study:
            raise SearchError("pass --study NAME (see `empas studies`)")
        if self.archetype not in ARCHETYPE_CHOICES:
            raise SearchError(f"archetype {self.archetype!r} is not one of {', '.join(ARCHETYPE_CHOICES)}")
        if self.format is not None and self.format not in FORMATS:
            raise SearchError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.basis not in BASES:
            raise SearchError(f"basis {self.basis!r} is not one of {', '.join(BASES)}")
        if self.max_mib is not None and not (_finite(self.max_mib) and self.max_mib > 0):
            raise SearchError(f"--max-mib must be a positive number, got {self.max_mib!r}")
        if self.max_ppl_rise is not None and not (_finite(self.max_ppl_rise) and self.max_ppl_rise >= 0):
            raise SearchError(f"--max-ppl-rise must be a percentage >= 0, got {self.max_ppl_rise!r}")
        for name, value in (("--heldout-tokens", self.heldout_tokens), ("--seq-len", self.seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SearchError(f"{name} must be a positive whole number, got {value!r}")
        if self.validate_points < 0:
            raise SearchError("--validate-points must be >= 0")
        if self.refine is not None and self.refine < 0:
            raise SearchError("--refine must be >= 0")
        return self

    @property
    def archetypes(self) -> tuple[str, ...]:
        return ARCHETYPES if self.archetype == "all" else (self.archetype,)

    @property
    def max_bytes(self) -> float | None:
        return None if self.max_mib is None else self.max_mib * MIB

    @property
    def ppl_rise_cap(self) -> float | None:
        """The cap as a fraction (0.25), or None for the default (:data:`DEFAULT_PPL_RISE_CAP`)."""
        return None if self.max_ppl_rise is None else self.max_ppl_rise / 100.0

    def with_(self, **kw) -> "ExportSettings":
        return replace(self, **kw)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["ExportSettings", "ARCHETYPE_CHOICES", "FORMATS", "DEFAULT_PPL_RISE_CAP"]
