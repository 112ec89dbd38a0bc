"""Archetype artifacts: one JSON file per chosen genome, the hand-off from search to deployment.

A file carries everything needed to apply it to the model later, and to refuse it for another model:

    {
      "schema": "empas.artifact/2",
      "archetype": "balanced",
      "model": {"id": "default", "fingerprint": "<sha256 of the weights>"},
      "quantizer": {"name": "ggml", "importance": "calibration"},   # or {"name": "rtn", "group_size": 64}
      "granularity": "linear",
      "genes": {"embed_tokens": "q8_0", "layers.0.self_attn.q_proj": "q4_1", ...},  # gene -> qtype
      "memory_bytes": 103123456,                          # the memory model's / the GGUF file's bytes
      "metrics": {"predicted": {...}, "measured": {...}}, # each labelled by where it came from
      "selection": {"rule": "...", "basis": "predicted"},  # optional: why this genome was chosen
      "source": {"study": "...", "trial": 123, "storage": "sqlite:///empas.db"},
      "created": "2026-11-27T14:00:00Z"
    }

``metrics.predicted`` holds the additive proxy's numbers; ``metrics.measured`` holds measurements keyed
by where they were taken (``"heldout"``: a validation on held-out tokens, ``"search"``: the study's
measured mode). Metric values are numbers or null (JSON has no NaN), nested at most one object deep.

Writes are atomic; :func:`load_artifact` validates a file and raises :class:`ArtifactError` with one
line that names the fix.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_bytes

SCHEMA = "empas.artifact/2"
QUANTIZERS = ("rtn", "ggml")
QTYPE = re.compile(r"[a-z0-9_]{1,16}")  # "4" (RTN bits), "q4_k" (ggml): checked by the quantiser on use


class ArtifactError(ValueError):
    pass


@dataclass
class Artifact:
    archetype: str
    model_id: str
    model_fingerprint: str
    quantizer: dict
    granularity: str
    genes: dict[str, str]
    memory_bytes: int
    metrics: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    created: str = ""
    selection: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "archetype": self.archetype,
            "model": {"id": self.model_id, "fingerprint": self.model_fingerprint},
            "quantizer": self.quantizer, "granularity": self.granularity, "genes": self.genes,
            "memory_bytes": int(self.memory_bytes), "metrics": self.metrics, "selection": self.selection,
            "source": self.source,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    @property
    def qtypes(self) -> list[str]:
        return list(self.genes.values())

    def check_model(self, fingerprint: str, where: str = "") -> None:
        if fingerprint != self.model_fingerprint:
            raise ArtifactError(
                f"artifact{where} was made for model {self.model_id} (weights {self.model_fingerprint[:12]}), "
                f"not the loaded one ({fingerprint[:12]}): pass --model {self.model_id} or re-export")


def save_artifact_bytes(artifact: Artifact, where: str = "artifact") -> bytes:
    """The artifact's file content, validated with the same checks as loading."""
    text = json.dumps(artifact.to_dict(), indent=2, allow_nan=False) + "\n"
    validate_artifact_dict(json.loads(text), Path(where))
    return text.encode("utf-8")


def save_artifact(artifact: Artifact, path: str | Path) -> Path:
    """Validate and write atomically: a reader sees the old file or the new one."""
    return atomic_write_bytes(path, save_artifact_bytes(artifact, str(path)))


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{_printable(str(path))}: {_printable(what)}; re-export it with `empas export`")


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a field name from the file (``"\\n"``) must not break the
    one-line error in two."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def load_artifact(path: str | Path) -> Artifact:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {p}: {exc.strerror or exc}; pass an exported artifact JSON") from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ArtifactError(f"{p}: key {str(exc)[:60]!r} appears twice; re-export it with `empas export`") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{p} is not valid JSON ({type(exc).__name__}); re-export it with `empas export`") from None
    return validate_artifact_dict(data, p)


def validate_artifact_dict(data, p: Path) -> Artifact:
    """Check a parsed artifact object field by field; :class:`ArtifactError` names the first problem."""
    _require(isinstance(data, dict), p, "top level is not an object")
    schema = data.get("schema")
    _require(schema == SCHEMA, p, f"unknown schema {schema!r} (expected {SCHEMA})")
    model = data.get("model")
    _require(isinstance(model, dict) and isinstance(model.get("id"), str) and model["id"]
             and isinstance(model.get("fingerprint"), str) and model["fingerprint"], p,
             "missing model id/fingerprint")
    quantizer = data.get("quantizer")
    _require(isinstance(quantizer, dict) and quantizer.get("name") in QUANTIZERS, p,
             "missing or unknown quantizer (expected rtn or ggml)")
    if quantizer["name"] == "rtn":
        _require(isinstance(quantizer.get("group_size"), int) and not isinstance(quantizer.get("group_size"), bool)
                 and quantizer["group_size"] > 0, p, "missing or invalid RTN group size")
    genes = data.get("genes")
    _require(isinstance(genes, dict) and len(genes) > 0, p, "no genes")
    for name, qtype in genes.items():
        _require(isinstance(qtype, str) and QTYPE.fullmatch(qtype) is not None, p,
                 f"gene {name[:60]!r} has an invalid qtype {str(qtype)[:20]!r}")
    memory = data.get("memory_bytes")
    _require(isinstance(memory, int) and not isinstance(memory, bool) and 0 < memory < 1 << 50, p,
             "memory_bytes is not a positive integer")
    granularity = data.get("granularity")
    _require(granularity in ("block", "linear"), p, f"unknown granularity {str(granularity)[:20]!r}")
    archetype = data.get("archetype", "custom")
    _require(isinstance(archetype, str) and 0 < len(archetype) <= 200, p, "archetype is not a short string")
    metrics = data.get("metrics", {})
    source = data.get("source", {})
    selection = data.get("selection", {})
    _require(isinstance(metrics, dict) and isinstance(source, dict) and isinstance(selection, dict), p,
             "metrics/source/selection must be objects")
    for label, block in metrics.items():
        _require(isinstance(block, dict), p, f"metrics.{label[:40]} is not an object")
        for key, value in block.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    _require(_scalar(v), p, f"metrics.{label[:30]}.{key[:30]}.{sub[:30]} is not a number, string or null")
            else:
                _require(_scalar(value), p, f"metrics.{label[:30]}.{key[:30]} is not a number, string or null")
    trial = source.get("trial")
    _require(trial is None or (isinstance(trial, int) and not isinstance(trial, bool) and trial >= 0), p,
             "source.trial is not a trial number")
    created = data.get("created", "")
    _require(isinstance(created, str), p, "created is not a string")
    return Artifact(archetype=archetype, model_id=model["id"],
                    model_fingerprint=model["fingerprint"], quantizer=quantizer, granularity=granularity,
                    genes={str(k): str(v) for k, v in genes.items()}, memory_bytes=memory, metrics=metrics,
                    source=source, created=created, selection=selection)


def _scalar(v) -> bool:
    """Metric values: finite numbers, short strings (labels), booleans or null."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, (int, float)):
        return math.isfinite(v)
    return isinstance(v, str) and len(v) <= 500


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def finite_or_none(x) -> float | None:
    """JSON has no NaN: metrics that could not be computed are written as null."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
