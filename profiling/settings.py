"""Everything a profile job is told, with its defaults and validators, in one place.

The CLI builds a :class:`ProfileSettings` from its flags, the TUI from its setup form, and the engine
takes it as it is: a default or a check written here holds for all three, and the error messages
(one line, naming the fix) are the same everywhere. Validation is cheap and happens before any model
is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

QUANTIZER_NAMES = ("ggml", "rtn")
DEFAULT_QUANTIZER = "ggml"  # llama.cpp's types, shipped as GGUF; "rtn" keeps the packed PyTorch path
GRANULARITIES = ("block", "linear")
METRICS = ("kl", "fisher")
#: How a KL profile is measured. ``fast`` (default): exact shortcuts, then screening on a prefix of the
#: calibration tokens, then the exact measurement of every cell that can still matter (see
#: docs/profiling.md). ``exact``: every cell on every calibration token, as before.
PROFILE_MODES = ("fast", "exact")
DEFAULT_PROFILE_MODE = "fast"
#: Fast mode: calibration tokens of the screening pass, and the margin a screened cell must lose by to a
#: cheaper-or-equal sibling, with confidence (per-token paired test), before it is skipped.
SCREEN_TOKENS = 128
SCREEN_MARGIN = 0.05

RTN_UNQUANTIZED = "16"
RTN_MIN_BITS, RTN_MAX_BITS = 2, 8
DEFAULT_RTN_BITS = ("2", "4", "8", "16")
DEFAULT_GROUP_SIZE = 64

DEFAULT_MODEL = "default"
DEFAULT_GRANULARITY = "linear"  # per-tensor choices: what GGUF files and llama-quantize mix
DEFAULT_METRIC = "kl"
DEFAULT_CALIB_TOKENS = 512
DEFAULT_HELDOUT_TOKENS = 512
DEFAULT_SEQ_LEN = 128
MAX_TOKENS = 10_000_000
DEVICES = ("auto", "cpu", "cuda", "mps")
STREAMED_FISHER = ("--metric fisher needs the whole model in memory (a backward pass): leave out --max-memory-mib / "
                   "--stream, or use --metric kl")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class QuantizerError(ValueError):
    """Impossible quantiser settings (an unknown type, a bad bit-width or group size); names the fix."""


class SettingsError(ValueError):
    """A profile setting that cannot work; the message is one line naming the fix."""


# -- quantiser ------------------------------------------------------------------------------------

def parse_rtn_bits(text) -> tuple[str, ...]:
    """"2,4,8,16" (or a list of ints/strings) -> ("2", "4", "8", "16"): unique, ascending, checked."""
    values = _split(text)
    if not values:
        raise QuantizerError("bit list is empty: pass e.g. --bits 2,4,8,16")
    out = set()
    for v in values:
        try:
            b = int(str(v).strip())
        except ValueError:
            raise QuantizerError(f"bit list {_show(text)!r} must be comma-separated integers, e.g. 2,4,8,16") from None
        if isinstance(v, bool) or (b != 16 and not RTN_MIN_BITS <= b <= RTN_MAX_BITS):
            raise QuantizerError(f"bit-width {v} is not supported: use {RTN_MIN_BITS} to {RTN_MAX_BITS}, "
                                 f"or 16 for unquantised")
        out.add(b)
    return tuple(str(b) for b in sorted(out))


def parse_ggml_types(text) -> tuple[str, ...]:
    """"q4_k,Q6_K,f16" -> ("f16", "q6_k", "q4_k"): known ggml types, unique, largest first."""
    from .quantizers.ggml_types import SUPPORTED, catalogue

    values = [str(v).strip().lower() for v in _split(text)]
    if not values:
        raise QuantizerError("type list is empty: pass e.g. --types q8_0,q6_k,q4_k,f16")
    known = catalogue()
    for v in values:
        if v not in known:
            raise QuantizerError(f"unknown ggml type {v!r}: choose from {','.join(s.lower() for s in SUPPORTED)}")
    unique = set(values)
    return tuple(sorted(unique, key=lambda v: (-known[v].bits_per_weight, v)))


def _split(text) -> list:
    if text is None:
        return []
    if isinstance(text, str):
        return [p for p in (s.strip() for s in text.split(",")) if p]
    return list(text)


def _show(text) -> str:
    return text if isinstance(text, str) else ",".join(map(str, text))


@dataclass(frozen=True)
class QuantizerSettings:
    """Which quantiser, which qtypes it offers, and what shapes its values.

    ``qtypes``: RTN bit-widths ("2".."8", "16") or ggml type labels ("q4_k", ..., "f16"); empty means
    the default list of that quantiser. ``imatrix``: for ggml, None (no importance matrix),
    ``"calibration"`` (collected on the calibration tokens in the dense pass, the default) or the path
    of a ``llama-imatrix`` file.
    """

    name: str = DEFAULT_QUANTIZER
    qtypes: tuple[str, ...] = ()
    group_size: int = DEFAULT_GROUP_SIZE
    imatrix: str | None = "calibration"

    @classmethod
    def parse(cls, name: str | None = None, qtypes=None, group_size: int | None = None,
              imatrix: str | None = "calibration") -> "QuantizerSettings":
        """From user input (flags, form fields): names and lists checked, defaults filled."""
        name = (name or DEFAULT_QUANTIZER).strip().lower()
        if name not in QUANTIZER_NAMES:
            raise QuantizerError(f"unknown quantiser {name!r}: choose one of {', '.join(QUANTIZER_NAMES)}")
        if name == "rtn":
            parsed = parse_rtn_bits(qtypes) if _split(qtypes) else DEFAULT_RTN_BITS
            s = cls(name="rtn", qtypes=parsed, group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size,
                    imatrix=None)
        else:
            from .quantizers.ggml_types import DEFAULT_TYPES

            parsed = parse_ggml_types(qtypes if _split(qtypes) else DEFAULT_TYPES)
            s = cls(name="ggml", qtypes=parsed, group_size=DEFAULT_GROUP_SIZE, imatrix=imatrix)
        s.validate()
        return s

    def validate(self) -> None:
        if self.name not in QUANTIZER_NAMES:
            raise QuantizerError(f"unknown quantiser {self.name!r}: choose one of {', '.join(QUANTIZER_NAMES)}")
        if not self.qtypes:
            raise QuantizerError("no quantisation types: pass --bits (rtn) or --types (ggml)")
        if self.name == "rtn":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                raise QuantizerError(f"group size {gs!r} must be a positive integer (e.g. 64)")
            if parse_rtn_bits(self.qtypes) != tuple(self.qtypes):
                raise QuantizerError(f"bit list {','.join(self.qtypes)} is not sorted and unique")
            if self.imatrix is not None:
                raise QuantizerError("--imatrix works with --quantizer ggml only")
            unquantized = RTN_UNQUANTIZED
        else:
            if parse_ggml_types(self.qtypes) != tuple(self.qtypes):
                raise QuantizerError(f"type list {','.join(self.qtypes)} is not in canonical order")
            if self.imatrix not in (None, "calibration") and not Path(self.imatrix).is_file():
                raise QuantizerError(f"importance matrix {self.imatrix} is not a file: pass a llama-imatrix "
                                     f"output (.gguf or .dat)")
            unquantized = "f16"
        if not any(q != unquantized for q in self.qtypes):
            raise QuantizerError(f"add at least one quantised type besides {unquantized}")
        if len(self.qtypes) < 2:
            raise QuantizerError(f"offer at least two types (e.g. {self.qtypes[0]},{unquantized}): the search "
                                 f"chooses between them")

    @property
    def unquantized(self) -> str:
        return RTN_UNQUANTIZED if self.name == "rtn" else "f16"

    def with_(self, **kw) -> "QuantizerSettings":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["qtypes"] = list(self.qtypes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizerSettings":
        return cls(name=d["name"], qtypes=tuple(d["qtypes"]), group_size=int(d.get("group_size", DEFAULT_GROUP_SIZE)),
                   imatrix=d.get("imatrix"))


# -- the profile job ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileSettings:
    """What to profile and how. The defaults here are the CLI's and the TUI's defaults."""

    model: str = DEFAULT_MODEL
    granularity: str = DEFAULT_GRANULARITY
    quantizer: QuantizerSettings = field(default_factory=QuantizerSettings.parse)
    include_embeddings: bool | None = None  # None: yes with ggml (a third of a small model's bytes), no with rtn
    metric: str | None = None  # None: KL, unless only a profile with another metric is stored (see jobs)
    mode: str = DEFAULT_PROFILE_MODE  # how a KL profile is measured: "fast" or "exact" (PROFILE_MODES)
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    heldout_tokens: int = DEFAULT_HELDOUT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    text_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_memory_mib: int | None = None  # cap on resident weights: a larger model is streamed block by block
    stream: bool | None = None  # None: stream only when the weights exceed max_memory_mib; True: always

    def validate(self) -> "ProfileSettings":
        """Raise a one-line error for anything that cannot work; return self for chaining."""
        if self.granularity not in GRANULARITIES:
            raise SettingsError(f"granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.metric is not None and self.metric not in METRICS:
            raise SettingsError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.mode not in PROFILE_MODES:
            raise SettingsError(f"profile mode {self.mode!r} is not one of {', '.join(PROFILE_MODES)}: pass "
                                f"--profile-mode fast or --profile-mode exact")
        self.quantizer.validate()
        if self.embeddings_are_genes and self.quantizer.name == "rtn":
            raise SettingsError("--include-embeddings needs --quantizer ggml (the RTN checkpoint keeps embeddings "
                                "in 16 bits)")
        validate_token_counts(self.calib_tokens, self.heldout_tokens, self.seq_len)
        if self.text_file:
            p = Path(self.text_file).expanduser()
            if not p.is_file():
                raise SettingsError(f"text file {self.text_file} does not exist: pass a UTF-8 plain-text file")
        device = self.device.split(":", 1)[0]
        if device not in DEVICES:
            raise SettingsError(f"device {self.device!r} is not one of {', '.join(DEVICES)} (cuda:N for a GPU)")
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        m = self.max_memory_mib
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise SettingsError("--max-memory-mib must be a positive whole number of MiB")
        return self

    @property
    def embeddings_are_genes(self) -> bool:
        if self.include_embeddings is None:
            return self.quantizer.name == "ggml"
        return bool(self.include_embeddings)

    @property
    def text_path(self) -> str | None:
        return self.text_file or None

    def with_(self, **kw) -> "ProfileSettings":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantizer"] = self.quantizer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileSettings":
        """The settings a profile was measured with (``Profile.extra["settings"]``)."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known and k != "quantizer"}
        kwargs.setdefault("mode", "exact")  # settings stored before fast profiles existed were exact
        return cls(quantizer=QuantizerSettings.from_dict(d["quantizer"]), **kwargs)

    def summary(self) -> str:
        """One line for status bars and logs."""
        q = self.quantizer
        types = ",".join(q.qtypes)
        emb = " + embeddings" if self.embeddings_are_genes else ""
        mode = f" ({self.mode})" if (self.metric or DEFAULT_METRIC) == "kl" else ""
        return (f"{self.model} | {self.granularity} genes{emb} | {q.name} {types} | {self.metric or DEFAULT_METRIC}{mode} on "
                f"{self.calib_tokens} calibration tokens ({self.text_file or 'built-in corpus'})")


def validate_token_counts(calib_tokens: int, heldout_tokens: int, seq_len: int) -> None:
    for name, value, flag in (("calibration tokens", calib_tokens, "--calib-tokens"),
                              ("held-out tokens", heldout_tokens, "--heldout-tokens"),
                              ("sequence length", seq_len, "--seq-len")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SettingsError(f"{name} must be a positive whole number: pass {flag} N")
        if value > MAX_TOKENS:
            raise SettingsError(f"{name} {value:,} is too many: pass {flag} {MAX_TOKENS:,} or less")
    if seq_len < 2:
        raise SettingsError("sequence length must be at least 2 tokens: pass --seq-len 2 or more")


def finite_positive(value, flag: str) -> float:
    """A finite number > 0, or a one-line error naming the flag."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{flag} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise SettingsError(f"{flag} must be a positive number, got {value!r}")
    return v
