"""What the user chose in the setup screen, and the field checks behind its inline messages.

The checks call the engine's own validators (``parse_bits``, ``make_quantizer``,
``validate_token_options``, ``resolve_model_spec``), so the TUI accepts exactly what the engine and the
CLI accept, and says so in the same words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace


@dataclass
class RunConfig:
    model: str = "default"
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8, 16])
    granularity: str = "block"
    metric: str = "kl"
    group_size: int = 64
    calib_tokens: int = 512
    heldout_tokens: int = 512
    seq_len: int = 128
    text_file: str = ""
    study: str = ""
    population: int = 32
    generations: int = 20
    seed: int = 0
    evaluate: str = "proxy"
    max_mib: float | None = None

    @property
    def text_path(self) -> str | None:
        return self.text_file or None

    @property
    def trials(self) -> int:
        return self.population * self.generations

    def with_(self, **kw) -> "RunConfig":
        return replace(self, **kw)

    def summary(self) -> str:
        bits = ",".join(map(str, self.bits))
        return (f"{self.model} | {self.granularity} genes | bits {bits} | {self.metric} on "
                f"{self.calib_tokens} calibration tokens ({self.text_file or 'built-in corpus'})")


STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _int(text: str, what: str, low: int, high: int, example: int) -> int:
    try:
        value = int(text.strip().replace("_", "").replace(",", ""))
    except ValueError:
        raise ValueError(f"{what} must be a whole number, e.g. {example}") from None
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high:,}")
    return value


def check_model(text: str) -> str:
    from profiling.models import resolve_model_spec

    spec = text.strip() or "default"
    resolve_model_spec(spec)  # raises ModelLoadError for a path that does not exist
    return spec


def check_bits(text: str) -> list[int]:
    from profiling.sensitivity import parse_bits

    bits = parse_bits(text)
    if not any(b < 16 for b in bits):
        raise ValueError("add at least one width below 16, e.g. 2,4,8,16")
    return bits


def check_group_size(text: str) -> int:
    from profiling.quantizer import make_quantizer

    value = _int(text, "group size", 1, 1 << 16, 64)
    make_quantizer("rtn", value)
    return value


def check_text_file(text: str) -> str:
    from pathlib import Path

    text = text.strip()
    if not text:
        return ""
    p = Path(text).expanduser()
    if not p.is_file():
        raise ValueError(f"{p} is not a file: give a plain-text file or leave empty for the built-in corpus")
    return str(p.resolve())


def check_study(text: str, existing: set[str]) -> str:
    name = text.strip()
    if not name:
        raise ValueError("give the study a name, e.g. smollm-block")
    if not STUDY_NAME.match(name):
        raise ValueError("use letters, digits, '.', '_' or '-' (up to 100), starting with a letter or digit")
    if name in existing:
        raise ValueError(f"study {name!r} exists: pick another name, or resume it from the studies screen")
    return name


def check_max_mib(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError("memory budget must be a number of MiB, e.g. 100, or empty for none") from None
    if not value > 0:
        raise ValueError("memory budget must be positive (MiB), or empty for none")
    return value


FIELD_CHECKS = {
    "model": check_model,
    "bits": check_bits,
    "group_size": check_group_size,
    "calib_tokens": lambda t: _int(t, "calibration tokens", 8, 10_000_000, 512),
    "heldout_tokens": lambda t: _int(t, "held-out tokens", 8, 10_000_000, 512),
    "seq_len": lambda t: _int(t, "sequence length", 8, 32_768, 128),
    "text_file": check_text_file,
    "population": lambda t: _int(t, "population", 4, 10_000, 32),
    "generations": lambda t: _int(t, "generations", 1, 100_000, 20),
    "seed": lambda t: _int(t, "seed", 0, 2**31 - 1, 0),
    "max_mib": check_max_mib,
}


def check_tokens(cfg: RunConfig) -> None:
    """Token counts against the sequence length and the text file (the engine's own check)."""
    from profiling.corpus import validate_token_options

    validate_token_options(cfg.calib_tokens, cfg.heldout_tokens, cfg.seq_len, cfg.text_path)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def suggest_study_name(cfg: RunConfig, existing: set[str]) -> str:
    from pathlib import Path

    base = Path(cfg.model).name if cfg.model not in ("", "default") else "smollm2"
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "study"
    base = f"{base}-{cfg.granularity}" + ("" if cfg.metric == "kl" else f"-{cfg.metric}")
    name, n = base, 2
    while name in existing:
        name, n = f"{base}-{n}", n + 1
    return name
