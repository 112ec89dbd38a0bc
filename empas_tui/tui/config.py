"""What the user chose in the setup form: the engine's own settings objects, built and checked there.

A :class:`RunConfig` is a :class:`profiling.settings.ProfileSettings` and a
:class:`search.settings.SearchSettings`, the very objects the CLI builds from its flags. The form's
starting values are those objects' defaults (read from the settings modules, never restated here),
and every field is checked by those objects' validators, so the TUI accepts what the CLI accepts and
says so in the same words. Search fields left empty mean what an omitted flag means: the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from profiling import settings as ps
from profiling.settings import ProfileSettings, QuantizerSettings, finite_positive
from search.settings import DEFAULT_TRIALS, SearchSettings

from .format import one_line

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
AUTO = "auto"  # the form's word for a setting left to the engine (None in the settings objects)


@dataclass(frozen=True)
class RunConfig:
    """A profile and a search, as the setup form describes them."""

    profile: ProfileSettings = field(default_factory=ProfileSettings)
    search: SearchSettings = field(default_factory=SearchSettings)

    @property
    def study(self) -> str:
        return self.search.study_name or ""

    def with_profile(self, **kw) -> "RunConfig":
        return replace(self, profile=replace(self.profile, **kw))

    def search_summary(self) -> str:
        s = self.search
        evaluate = s.evaluate or SearchSettings.DEFAULTS["evaluate"]
        population = s.population or SearchSettings.DEFAULTS["population"]
        trials = s.target_trials(population)
        budget = f", <= {s.max_mib:g} MiB" if s.max_mib else ""
        return f"{evaluate} search: {trials} trials, population {population}{budget}"


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    help: str
    options: tuple[tuple[str, str], ...] = ()  # (label, value) for a select; empty for a text input
    placeholder: str = ""

    @property
    def is_select(self) -> bool:
        return bool(self.options)


def _trials_placeholder() -> str:
    return "default: " + ", ".join(f"{n} ({mode})" for mode, n in DEFAULT_TRIALS.items())


def form_fields() -> list[FormField]:
    """The setup form, in order (built on call: the ggml type list comes from its catalogue)."""
    d = SearchSettings.DEFAULTS
    return [
        FormField("model", "Model", "default = embedded SmolLM2-135M; or a Hugging Face id, a folder, a .gguf file"),
        FormField("quantizer", "Quantiser", "ggml ships as GGUF (llama.cpp); rtn as a packed checkpoint",
                  (("ggml: llama.cpp's types (q4_k, q6_k, ...)", "ggml"),
                   ("rtn: round-to-nearest bit-widths (2-8, 16)", "rtn"))),
        FormField("qtypes", "Types", "comma-separated; each layer is offered the ones that fit its shape"),
        FormField("group_size", "Group size", "rtn: input columns sharing a scale and zero"),
        FormField("imatrix", "Importance", "ggml: 'calibration' (collected), a llama-imatrix file, or 'none'"),
        FormField("include_embeddings", "Embeddings", "search the token embedding / output head too",
                  (("auto: yes with ggml, no with rtn", AUTO), ("yes: embedding and head are genes", "yes"),
                   ("no: keep them unquantised", "no"))),
        FormField("granularity", "Granularity", "genes: one type per block or per linear layer",
                  (("block: one type per decoder block", "block"),
                   ("linear: one per linear layer (q,k,v,o,gate,up,down)", "linear"))),
        FormField("metric", "Metric", "how a layer's damage is measured",
                  (("auto: KL, or the stored profile's metric", AUTO), ("kl: measured KL to the dense model", "kl"),
                   ("fisher: fast Fisher estimate of the KL", "fisher"))),
        FormField("text_file", "Calibration text", "plain-text file; empty = built-in English corpus",
                  placeholder="empty = built-in corpus"),
        FormField("calib_tokens", "Calib. tokens", "tokens used to measure each layer's sensitivity"),
        FormField("heldout_tokens", "Held-out tokens", "tokens kept aside from calibration"),
        FormField("seq_len", "Sequence length", "tokens per sequence"),
        FormField("device", "Device", "auto, cpu, cuda[:N] or mps"),
        FormField("dtype", "Dtype", "compute dtype", tuple((t, t) for t in ps.DTYPES)),
        FormField("max_memory_mib", "Max memory MiB", "above this many MiB of weights, run block by block from disk",
                  placeholder="empty = whole model in memory"),
        FormField("study", "Study name", "where the search is stored; resume it later by this name"),
        FormField("evaluate", "Evaluate", "how each genome is scored",
                  (("proxy: predicted loss, sum of the profile (fast)", "proxy"),
                   ("measured: real KL of every genome (slow)", "measured"))),
        FormField("population", "Population", "NSGA-II genomes per generation",
                  placeholder=f"default: {d['population']}"),
        FormField("trials", "Trials", "trials this run adds (rounded up to whole generations)",
                  placeholder=_trials_placeholder()),
        FormField("seed", "Seed", "random seed of the search", placeholder=f"default: {d['seed']}"),
        FormField("max_mib", "Max MiB", "optional memory budget", placeholder="empty = no budget"),
    ]


QUANTIZER_FIELDS = ("quantizer", "qtypes", "group_size", "imatrix")
PROFILE_FIELDS = ("model", "include_embeddings", "granularity", "metric", "text_file", "calib_tokens",
                  "heldout_tokens", "seq_len", "device", "dtype", "max_memory_mib")
SEARCH_FIELDS = ("evaluate", "population", "trials", "seed", "max_mib")
RTN_ONLY, GGML_ONLY = ("group_size",), ("imatrix",)


# -- settings -> form text ---------------------------------------------------------------------------

def default_qtypes_text(quantizer: str) -> str:
    return ",".join(QuantizerSettings.parse(quantizer).qtypes)


def form_values(cfg: RunConfig | None = None) -> dict[str, str]:
    """The text of every field for ``cfg`` (default: the settings modules' defaults)."""
    cfg = cfg or RunConfig()
    p, q, s = cfg.profile, cfg.profile.quantizer, cfg.search
    emb = {None: AUTO, True: "yes", False: "no"}[p.include_embeddings]
    values = {
        "model": p.model, "quantizer": q.name, "qtypes": ",".join(q.qtypes),
        "group_size": str(q.group_size) if q.name == "rtn" else str(ps.DEFAULT_GROUP_SIZE),
        "imatrix": (QuantizerSettings.parse("ggml").imatrix if q.name == "rtn" else q.imatrix) or "none",
        "include_embeddings": emb, "granularity": p.granularity, "metric": p.metric or AUTO,
        "text_file": p.text_file or "", "calib_tokens": str(p.calib_tokens), "heldout_tokens": str(p.heldout_tokens),
        "seq_len": str(p.seq_len), "device": p.device, "dtype": p.dtype,
        "max_memory_mib": "" if p.max_memory_mib is None else str(p.max_memory_mib), "study": s.study_name or "",
        "evaluate": s.evaluate or SearchSettings.DEFAULTS["evaluate"],
    }
    for name in ("population", "trials", "seed"):
        v = getattr(s, name)
        values[name] = "" if v is None else str(v)
    values["max_mib"] = "" if s.max_mib is None else f"{s.max_mib:g}"
    return values


# -- form text -> settings, with one message per field --------------------------------------------------

def _int_or_text(text: str):
    """A whole number if the text is one, else the text itself (the validator then names the fix)."""
    t = text.strip().replace("_", "").replace(",", "")
    try:
        return int(t)
    except ValueError:
        return text.strip()


def _search_int(text: str, what: str):
    t = text.strip().replace("_", "").replace(",", "")
    if not t:
        return None
    try:
        return int(t)
    except ValueError:
        default = SearchSettings.DEFAULTS.get(what, DEFAULT_TRIALS["proxy"])
        raise ps.SettingsError(f"{what} must be a whole number, e.g. {default}") from None


def check_model(text: str) -> str:
    from profiling.models import resolve_model_spec

    spec = text.strip() or ps.DEFAULT_MODEL
    resolve_model_spec(spec)  # a path that does not exist fails here, before any load
    return spec


def check_study(text: str, existing: set[str]) -> str:
    name = text.strip()
    if not name:
        raise ValueError("give the study a name, e.g. smollm-block")
    if not STUDY_NAME.match(name):
        raise ValueError("use letters, digits, '.', '_' or '-' (up to 100), starting with a letter or digit")
    if name in existing:
        raise ValueError(f"study {name!r} exists: pick another name, or resume it from the studies screen")
    return name


class _Errors(dict):
    def attempt(self, name: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the engine's validators raise ValueError subclasses with the fix
            self.setdefault(name, one_line(exc))
            return None


def _quantizer(values: dict[str, str], errors: _Errors) -> QuantizerSettings | None:
    name = values["quantizer"]
    rtn = name == "rtn"
    group_size = imatrix = None
    if rtn:
        group_size = errors.attempt("group_size", lambda: QuantizerSettings.parse(
            "rtn", None, _int_or_text(values["group_size"])).group_size)
    else:
        text = values["imatrix"].strip()
        imatrix = None if text.lower() in ("", "none") else text
        errors.attempt("imatrix", lambda: QuantizerSettings.parse("ggml", None, None, imatrix))
    if "group_size" in errors or "imatrix" in errors:
        return None
    quantizer = errors.attempt("qtypes", lambda: QuantizerSettings.parse(name, values["qtypes"], group_size, imatrix))
    if quantizer is not None and len(quantizer.qtypes) < 2:  # the search's own rule, checked before profiling
        errors["qtypes"] = (f"offer at least two types to choose between, e.g. {default_qtypes_text(name)} "
                            f"(only {quantizer.qtypes[0]} given)")
        return None
    return quantizer


def parse_form(values: dict[str, str], existing: set[str] = frozenset()) -> tuple[RunConfig | None, dict[str, str]]:
    """(the config, {}) or (None, {field: one-line message}) for the form's text values.

    Each profile field is checked alone against the defaults of the others (its message lands under
    it), then all together."""
    errors = _Errors()
    quantizer = _quantizer(values, errors)
    typed = {
        "model": errors.attempt("model", lambda: check_model(values["model"])),
        "include_embeddings": {AUTO: None, "yes": True, "no": False}[values["include_embeddings"]],
        "granularity": values["granularity"],
        "metric": None if values["metric"] == AUTO else values["metric"],
        "text_file": values["text_file"].strip() or None,
        "calib_tokens": _int_or_text(values["calib_tokens"]),
        "heldout_tokens": _int_or_text(values["heldout_tokens"]),
        "seq_len": _int_or_text(values["seq_len"]),
        "device": values["device"].strip() or "auto",
        "dtype": values["dtype"],
        "max_memory_mib": _int_or_text(values["max_memory_mib"]) if values.get("max_memory_mib", "").strip() else None,
    }
    # A field is checked against the chosen quantiser (its default types when the typed ones are wrong).
    base = ProfileSettings(quantizer=quantizer or QuantizerSettings.parse(values["quantizer"]))
    for name in PROFILE_FIELDS:
        if name not in errors:
            errors.attempt(name, lambda n=name: replace(base, **{n: typed[n]}).validate())
    profile = None
    if not errors:
        profile = errors.attempt("calib_tokens", lambda: ProfileSettings(quantizer=quantizer, **typed).validate())

    study = errors.attempt("study", lambda: check_study(values["study"], existing))
    evaluate = values["evaluate"]  # the default is what an omitted --evaluate means: None
    search_kw = {"evaluate": None if evaluate == SearchSettings.DEFAULTS["evaluate"] else evaluate,
                 "population": errors.attempt("population", lambda: _search_int(values["population"], "population")),
                 "trials": errors.attempt("trials", lambda: _search_int(values["trials"], "trials")),
                 "seed": errors.attempt("seed", lambda: _search_int(values["seed"], "seed")),
                 "max_mib": errors.attempt("max_mib", lambda: finite_positive(values["max_mib"], "--max-mib")
                                           if values["max_mib"].strip() else None)}
    for name in SEARCH_FIELDS:
        if name not in errors:
            errors.attempt(name, lambda n=name: SearchSettings(**{n: search_kw[n]}).validate())
    if errors:
        return None, dict(errors)
    return RunConfig(profile=profile, search=SearchSettings(study_name=study, **search_kw)), {}


# -- from what the storage holds ------------------------------------------------------------------------

def config_from_profile_header(header: dict) -> RunConfig:
    """A setup prefilled so that profiling hits a cached profile (same model, corpus, quantiser, genes,
    and the ``qtypes`` it holds cells of, when the header lists them)."""
    d = ProfileSettings()
    identity = header.get("quantizer") or {}
    name = identity.get("name", d.quantizer.name)
    imatrix = identity.get("imatrix")  # None, "calibration", or the sha256 of a file (then: type its path)
    if name != "ggml" or not (imatrix is None or isinstance(imatrix, str)):
        imatrix = QuantizerSettings.parse("ggml").imatrix if name == "ggml" else None
    try:
        quantizer = QuantizerSettings.parse(name, header.get("qtypes") or None,
                                            identity.get("group_size") if name == "rtn" else None, imatrix)
    except ValueError:
        quantizer = d.quantizer
    source = header.get("corpus_source", "default")
    kw = {"model": header.get("model_id") or d.model, "granularity": header.get("granularity", d.granularity),
          "metric": header.get("metric"), "quantizer": quantizer, "include_embeddings": header.get("include_embeddings"),
          "text_file": None if source == "default" else source}
    for name in ("calib_tokens", "heldout_tokens", "seq_len"):
        stored = header.get("calibration_tokens" if name == "calib_tokens" else name)
        if isinstance(stored, int) and not isinstance(stored, bool) and stored > 0:
            kw[name] = stored
    return RunConfig(profile=ProfileSettings(**kw))


def settings_from_profile(profile) -> ProfileSettings:
    """The profile settings that rebuild a stored profile's setup (a measured study's resume)."""
    stored = profile.extra.get("quantizer_settings") if isinstance(profile.extra, dict) else None
    quantizer = QuantizerSettings.from_dict(stored) if stored else ProfileSettings().quantizer
    corpus = profile.corpus_source
    return ProfileSettings(model=profile.model_id, granularity=profile.granularity, quantizer=quantizer,
                           include_embeddings=profile.include_embeddings, metric=profile.metric,
                           mode=getattr(profile, "mode", "exact"), calib_tokens=profile.calibration_tokens,
                           text_file=None if corpus == "default" else corpus)


def suggest_study_name(cfg: RunConfig, existing: set[str]) -> str:
    """The CLI's default study name for these settings (``search.study_record.default_study_name``),
    numbered when taken."""
    from profiling.models import resolve_model_spec
    from search.study_record import study_name

    p = cfg.profile
    try:
        model_id = resolve_model_spec(p.model)
    except Exception:  # noqa: BLE001 - ModelLoadError: a path that does not exist (yet); its field says so
        model_id = p.model
    base = study_name(model_id, p.granularity, p.quantizer.name, p.quantizer.qtypes, p.embeddings_are_genes,
                      p.metric or ps.DEFAULT_METRIC, cfg.search.evaluate or SearchSettings.DEFAULTS["evaluate"])
    name, n = base, 2
    while name in existing:
        name, n = f"{base}-{n}", n + 1
    return name


