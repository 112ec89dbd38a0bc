"""Loading, once, the model a study or an artifact was made for, and refusing any other weights."""

from __future__ import annotations

from profiling.models import LoadedModel, load_model
from profiling.quantizers import make_quantizer
from profiling.settings import QuantizerSettings
from storage.artifacts import ArtifactError


def check_model(loaded: LoadedModel, model_id: str, fingerprint: str | None) -> LoadedModel:
    """Refuse a loaded model whose weights are not ``fingerprint``'s (the genomes were made for those)."""
    if fingerprint is not None and loaded.fingerprint != fingerprint:
        raise ArtifactError(f"the loaded model {loaded.model_id} (weights {loaded.fingerprint[:12]}) is not the one "
                            f"these genomes were made for ({model_id}, weights {fingerprint[:12]}): "
                            f"pass --model {model_id}")
    return loaded


def load_checked(model: str | None, model_id: str, fingerprint: str | None, placement=None) -> LoadedModel:
    """``model`` (default: ``model_id``), refused unless its weights are ``fingerprint``'s.

    ``placement``: a :class:`ProfileSettings`-like object with ``device``, ``dtype``, ``max_memory_mib``
    and ``stream`` (the evaluate command's flags); None loads float32 on the CPU."""
    if placement is None:
        return check_model(load_model(model or model_id), model_id, fingerprint)
    from profiling.sensitivity import load_for

    loaded, _ = load_for(placement.with_(model=model or model_id))
    return check_model(loaded, model_id, fingerprint)


def quantizer_for(profile_extra: dict, identity: dict, qtypes):
    """The quantiser a profile (or artifact) was measured with, rebuilt from what it stored."""
    stored = profile_extra.get("quantizer_settings") if isinstance(profile_extra, dict) else None
    if stored:
        settings = QuantizerSettings.from_dict(stored)
    elif identity.get("name") == "rtn":
        settings = QuantizerSettings.parse("rtn", sorted({str(q) for q in qtypes} | {"2", "16"}, key=int),
                                           int(identity.get("group_size", 64)))
    else:
        settings = QuantizerSettings.parse("ggml", sorted({str(q) for q in qtypes} | {"q8_0", "f16"}))
    return make_quantizer(settings)
