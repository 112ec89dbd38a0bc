"""How an EMPAS study is recorded in Optuna: its name, its attributes, and what makes a resume valid.

A study is self-contained: its user attributes hold the profile it was searched on (chunked JSON),
the search settings, the quantiser and the genome layout, so resume, export and optuna-dashboard
need nothing else. Everything under the ``empas:`` prefix is written here and read here.
"""

from __future__ import annotations

import re

from profiling.profile import Profile
from storage import studies as st

from .settings import SearchError, SearchSettings

SCHEMA = 2  # 2: genomes of qtype strings ("q4_k", "4") under the "genome" attribute
ATTR = "empas:"


def study_name(model_id: str, granularity: str, quantizer: str, qtypes, include_embeddings: bool, metric: str,
               evaluate: str = "proxy") -> str:
    """``<model>-<granularity>-<qtypes>`` (RTN: ``default-block-2.4.8.16``; ggml's default types:
    ``default-linear-ggml``), plus ``-emb`` / ``-noemb``, the metric and ``-measured`` when they differ
    from the defaults (embeddings are genes by default with ggml, not with rtn)."""
    from profiling.quantizers.ggml_types import DEFAULT_TYPES
    from profiling.settings import parse_ggml_types

    model = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.rstrip("/").rsplit("/", 1)[-1]) or "model"
    name = f"{model}-{granularity}"
    if quantizer == "ggml":
        name += "-ggml"
        if tuple(qtypes) != parse_ggml_types(DEFAULT_TYPES):
            name += "-" + ".".join(qtypes)
    else:
        name += "-" + ".".join(qtypes)
    if include_embeddings != (quantizer == "ggml"):
        name += "-emb" if include_embeddings else "-noemb"
    if metric != "kl":
        name += f"-{metric}"
    if evaluate == "measured":
        name += "-measured"
    return name


def default_study_name(profile: Profile, evaluate: str = "proxy") -> str:
    """The default name of a study searched on ``profile``."""
    return study_name(profile.model_id, profile.granularity, profile.quantizer.get("name", "rtn"), profile.qtypes,
                      profile.include_embeddings, profile.metric, evaluate)


def study_id(storage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def is_empas(attrs: dict) -> bool:
    return attrs.get(ATTR + "schema") is not None


def check_schema(attrs: dict, name: str) -> None:
    """Refuse a non-EMPAS study, or one written by an EMPAS whose genome layout this one cannot read."""
    schema = attrs.get(ATTR + "schema")
    if schema is None:
        raise SearchError(f"study {name!r} is not an EMPAS study: pass another --study")
    if schema != SCHEMA:
        raise SearchError(f"study {name!r} was written by another EMPAS version (schema {schema}, this one "
                          f"reads {SCHEMA}): pass a new --study")


def stored_profile(attrs: dict, name: str) -> Profile:
    data = st.get_study_json(attrs, ATTR + "profile")
    if data is None:
        raise SearchError(f"study {name!r} has no stored EMPAS profile (not an EMPAS study, or damaged): "
                          f"pass another --study")
    try:
        return Profile.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise SearchError(f"study {name!r} has a damaged EMPAS profile ({type(exc).__name__}): "
                          f"pass another --study") from None


def stored_settings(attrs: dict, name: str) -> dict:
    settings = attrs.get(ATTR + "settings") or {}
    if not isinstance(settings, dict):
        raise SearchError(f"study {name!r} has damaged EMPAS settings: pass another --study")
    return dict(settings)


def stored_evaluate(attrs: dict) -> str:
    return attrs.get(ATTR + "evaluate", "proxy")


def check_compatible(name: str, stored: Profile, profile: Profile) -> None:
    """A study continues only on the profile it was started with; say which option differs."""
    if stored.model_fingerprint != profile.model_fingerprint:
        raise SearchError(f"study {name!r} belongs to model {stored.model_id} (fingerprint "
                          f"{stored.model_fingerprint[:12]}), not {profile.model_id} ({profile.model_fingerprint[:12]}): "
                          f"pass another --study or that model")
    if stored.gene_names != profile.gene_names:
        raise SearchError(f"study {name!r} searches {stored.n_genes} {stored.granularity} genes, this profile has "
                          f"{profile.n_genes} {profile.granularity} genes: pass --granularity {stored.granularity} "
                          f"(and the same --include-embeddings) or another --study")
    if stored.quantizer.get("name") != profile.quantizer.get("name"):
        raise SearchError(f"study {name!r} used quantiser {stored.quantizer.get('name')}, not "
                          f"{profile.quantizer.get('name')}: pass --quantizer {stored.quantizer.get('name')} "
                          f"or another --study")
    if list(stored.qtypes) != list(profile.qtypes):
        flag = "--bits" if stored.quantizer.get("name") == "rtn" else "--types"
        raise SearchError(f"study {name!r} uses {','.join(stored.qtypes)}, not {','.join(profile.qtypes)}: "
                          f"pass {flag} {','.join(stored.qtypes)} or another --study")
    if stored.quantizer != profile.quantizer:
        raise SearchError(f"study {name!r} used quantiser {stored.quantizer}, not {profile.quantizer}: "
                          f"pass the same --group-size / --imatrix or another --study")
    if stored.key != profile.key:
        raise SearchError(f"study {name!r} was built from another profile (metric {stored.metric}, "
                          f"{stored.calibration_tokens} calibration tokens of {stored.corpus_source}): "
                          f"pass the same profiling options or another --study")


def create_study(storage, name: str, profile: Profile, settings: SearchSettings) -> int | None:
    """The study with every attribute, in one transaction; None if another worker created it first."""
    loss_name = "measured_loss" if settings.evaluate == "measured" else "predicted_loss"
    attrs = {ATTR + key: value for key, value in (
        ("model_id", profile.model_id), ("model_fingerprint", profile.model_fingerprint),
        ("granularity", profile.granularity), ("metric", profile.metric), ("qtypes", list(profile.qtypes)),
        ("n_genes", profile.n_genes), ("quantizer", profile.quantizer), ("profile_key", profile.key),
        ("memory_basis", profile.memory_basis), ("evaluate", settings.evaluate), ("settings", settings.stored()),
        ("genome_attr", f"trial user attribute {st.GENOME_ATTR!r}: one qtype per gene, in the order of "
                        f"the profile's gene_names"))}
    attrs.update(st.json_chunks(ATTR + "profile", profile.to_dict()))
    attrs[ATTR + "schema"] = SCHEMA
    return st.create_study_rows(storage, name, 2, {"study:metric_names": [loss_name, "memory_bytes"]}, attrs)


def save_settings(storage, sid: int, settings: SearchSettings) -> None:
    st.set_study_user_attrs(storage, sid, {ATTR + "settings": settings.stored()})
