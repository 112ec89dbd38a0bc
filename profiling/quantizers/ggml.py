"""The ``ggml`` backend: llama.cpp's own quantisers, called in the packaged ``libggml-base``.

Quantising goes through ``ggml_quantize_chunk`` of the ``libggml-base`` that ``pip install
llama-cpp-python`` builds (found without importing ``llama_cpp``, so no model or backend is loaded;
``EMPAS_GGML_LIB`` overrides the path), so the bytes are the ones ``llama-quantize --pure`` writes.
Dequantising uses ``gguf.quants.dequantize`` (llama.cpp's Python package, bit-exact with ggml's own
``to_float``). ``f16`` is a plain float16 round trip: what llama.cpp stores for an unquantised weight.

ggml stops the whole process (``GGML_ASSERT``) on inputs it does not accept, so every call is checked
here first: the row length fits the type, weights and importance are finite, the importance has one
non-negative value per input column.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..settings import QuantizerError, QuantizerSettings, parse_ggml_types
from .ggml_types import DEFAULT_TYPES, UNQUANTIZED, GgmlType, catalogue

LIB_ENV = "EMPAS_GGML_LIB"
_LIB_FILES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
_INSTALL_HINT = "pip install llama-cpp-python (it builds llama.cpp from source, several minutes)"
#: a matrix is split over threads only when each thread gets at least this many weights
_MIN_WEIGHTS_PER_THREAD = 1 << 18


class GgmlLibraryError(QuantizerError):
    """libggml-base is missing, unloadable, or disagrees with ``gguf`` on the type catalogue."""


# -- the native library -------------------------------------------------------------------------

def find_library() -> Path:
    """Path of ``libggml-base``: ``$EMPAS_GGML_LIB`` (a file or a folder), else ``llama_cpp/lib/``."""
    name = _LIB_FILES.get(sys.platform, _LIB_FILES["linux"])
    override = os.environ.get(LIB_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            path = path / name
        if not path.is_file():
            raise GgmlLibraryError(f"{LIB_ENV}={override} is not a libggml-base library: point it at "
                                   f"llama_cpp/lib/{name} of an installed llama-cpp-python, or unset it")
        return path
    spec = importlib.util.find_spec("llama_cpp")  # locates the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        for candidate in (Path(folder) / "lib" / name, Path(folder) / name):
            if candidate.is_file():
                return candidate
    if not folders:
        raise GgmlLibraryError(f"the ggml quantiser needs llama-cpp-python: {_INSTALL_HINT}, or set {LIB_ENV}")
    raise GgmlLibraryError(f"llama-cpp-python at {folders[0]} has no lib/{name}: reinstall it ({_INSTALL_HINT}), "
                           f"or set {LIB_ENV}")


class GgmlLibrary:
    """ctypes binding of the few ggml functions EMPAS calls; checked against the type catalogue."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise GgmlLibraryError(f"cannot load {self.path} ({exc}): reinstall llama-cpp-python "
                                   f"({_INSTALL_HINT}), or set {LIB_ENV}") from None
        c_type = ctypes.c_int  # enum ggml_type
        signatures = {
            "ggml_quantize_chunk": ([c_type, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_void_p], ctypes.c_size_t),
            "ggml_quantize_init": ([c_type], None),
            "ggml_quantize_requires_imatrix": ([c_type], ctypes.c_bool),
            "ggml_row_size": ([c_type, ctypes.c_int64], ctypes.c_size_t),
            "ggml_blck_size": ([c_type], ctypes.c_int64),
            "ggml_type_size": ([c_type], ctypes.c_size_t),
            "ggml_type_name": ([c_type], ctypes.c_char_p),
            "ggml_version": ([], ctypes.c_char_p),
        }
        for fn_name, (args, result) in signatures.items():
            try:
                fn = getattr(lib, fn_name)
            except AttributeError:
                raise GgmlLibraryError(f"{self.path} has no {fn_name}: install a llama-cpp-python built with "
                                       f"ggml's quantisers ({_INSTALL_HINT})") from None
            fn.argtypes, fn.restype = args, result
        self._lib = lib
        self.version = lib.ggml_version().decode()
        self._check_catalogue()

    def _check_catalogue(self) -> None:
        """Fail loudly if ``gguf``'s enum ids, block or type sizes are not this library's."""
        lib = self._lib
        for t in catalogue().values():
            native = (lib.ggml_type_name(t.type_id) or b"?").decode()
            sizes = (lib.ggml_blck_size(t.type_id), lib.ggml_type_size(t.type_id))
            if native.lower() != t.label or sizes != (t.block_size, t.type_size):
                raise GgmlLibraryError(
                    f"{self.path} (ggml {self.version}) has type id {t.type_id} = {native} {sizes}, the gguf package "
                    f"says {t.name} {(t.block_size, t.type_size)}: install matching gguf and llama-cpp-python versions")
            if lib.ggml_quantize_requires_imatrix(t.type_id):
                raise GgmlLibraryError(f"ggml {self.version} cannot quantise {t.name} without an importance matrix: "
                                       f"remove it from the offered types")

    def row_bytes(self, t: GgmlType, n_per_row: int) -> int:
        return int(self._lib.ggml_row_size(t.type_id, n_per_row))

    def quantize(self, t: GgmlType, rows: np.ndarray, importance: np.ndarray | None,
                 pool: ThreadPoolExecutor | None = None, threads: int = 1) -> np.ndarray:
        """``rows`` (n, k) C-contiguous float32, checked by the caller -> (n, row_bytes) uint8.

        With a ``pool``, up to ``threads`` slices of rows are quantised at once (each row is independent)."""
        n, k = rows.shape
        row_bytes = self.row_bytes(t, k)
        out = np.empty((n, row_bytes), dtype=np.uint8)
        src, dst = rows.ctypes.data, out.ctypes.data
        imatrix = None if importance is None else importance.ctypes.data
        self._lib.ggml_quantize_init(t.type_id)  # thread-safe, a no-op after the first call

        def run(first: int, last: int) -> int:  # ctypes releases the GIL for the call
            return self._lib.ggml_quantize_chunk(t.type_id, src, dst, first * k, last - first, k, imatrix)

        workers = 1 if pool is None else min(threads, max(1, n * k // _MIN_WEIGHTS_PER_THREAD), n)
        if workers <= 1:
            written = run(0, n)
        else:
            bounds = np.linspace(0, n, workers + 1).astype(int)
            written = sum(pool.map(run, bounds[:-1], bounds[1:]))
        if written != out.nbytes:  # ggml asserts this itself; kept as a guard against a changed ABI
            raise GgmlLibraryError(f"ggml wrote {written} bytes for {n}x{k} {t.name}, expected {out.nbytes}")
        return out


_library: GgmlLibrary | None = None
_library_lock = threading.Lock()


def load_library() -> GgmlLibrary:
    """The process-wide :class:`GgmlLibrary` (loaded and checked once)."""
    global _library
    with _library_lock:
        if _library is None:
            _library = GgmlLibrary(find_library())
        return _library


# -- the quantiser --------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class GgmlQuantizer:
    """llama.cpp's per-tensor types as a :class:`~profiling.quantizers.Quantizer`.

    ``imatrix``: None (importance is ignored, as ``llama-quantize`` without ``--imatrix``),
    ``"calibration"`` or the path of a ``llama-imatrix`` file (importance is used where given).
    ``threads``: how many threads quantise one matrix (rows are independent, the bytes do not change).
    """

    name = "ggml"
    unquantized = UNQUANTIZED

    def __init__(self, qtypes=None, imatrix: str | None = None, threads: int | None = None):
        self.qtypes = parse_ggml_types(qtypes if qtypes else DEFAULT_TYPES)
        self.imatrix = imatrix
        self.imatrix_sha256 = None if imatrix in (None, "calibration") else file_sha256(imatrix)
        self._types = {label: catalogue()[label] for label in self.qtypes}
        self._lib = load_library()
        self.threads = max(1, int(threads if threads is not None else min(8, os.cpu_count() or 1)))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggml") if self.threads > 1 else None

    @classmethod
    def from_settings(cls, settings: QuantizerSettings, threads: int | None = None) -> "GgmlQuantizer":
        settings.validate()
        if settings.name != "ggml":
            raise QuantizerError(f"quantiser settings are for {settings.name!r}, not ggml")
        return cls(settings.qtypes, imatrix=settings.imatrix, threads=threads)

    @property
    def uses_importance(self) -> bool:
        """Whether an importance vector passed to :meth:`fake_quantize` / :meth:`quantize_bytes` is used."""
        return self.imatrix is not None

    @property
    def library_version(self) -> str:
        return self._lib.version

    def settings(self) -> dict:
        """What changes the quantised values: the importance source and the ggml build (not the qtypes)."""
        if self.imatrix is None or self.imatrix == "calibration":
            source = self.imatrix
        else:
            source = {"sha256": self.imatrix_sha256}
        return {"name": self.name, "imatrix": source, "ggml": self._lib.version}

    def __repr__(self) -> str:
        return f"GgmlQuantizer(qtypes={','.join(self.qtypes)}, imatrix={self.imatrix!r}, ggml={self._lib.version})"

    # -- sizes and shapes ---------------------------------------------------------------------------
    def _known(self, qtype: str) -> GgmlType:
        t = self._types.get(str(qtype).strip().lower())
        if t is None:
            raise QuantizerError(f"ggml type {qtype!r} is not offered: choose one of {','.join(self.qtypes)}")
        return t

    def valid_for(self, qtype: str, out_features: int, in_features: int) -> bool:
        t = self._types.get(str(qtype).strip().lower())
        return t is not None and out_features > 0 and t.fits(in_features)

    def _checked(self, qtype: str, out_features: int, in_features: int) -> GgmlType:
        t = self._known(qtype)
        if out_features <= 0 or not t.fits(in_features):
            valid = [q for q in self.qtypes if self.valid_for(q, out_features, in_features)]
            raise QuantizerError(f"ggml type {t.label} cannot store a {out_features}x{in_features} weight (rows of "
                                 f"{in_features} are not a multiple of {t.block_size}): use one of "
                                 f"{','.join(valid) or 'none'}")
        return t

    def bits_per_weight(self, qtype: str) -> float:
        return self._known(qtype).bits_per_weight

    def weight_bytes(self, qtype: str, out_features: int, in_features: int) -> int:
        return out_features * self._checked(qtype, out_features, in_features).row_bytes(in_features)

    # -- values -----------------------------------------------------------------------------------
    def quantize_bytes(self, weight_out_in: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
        """The ``(out, row_bytes)`` uint8 rows a GGUF file stores for this ``(out, in)`` weight."""
        w = np.ascontiguousarray(weight_out_in, dtype=np.float32)
        if w.ndim != 2:
            raise QuantizerError(f"expected an (out, in) matrix, got shape {tuple(w.shape)}")
        t = self._checked(qtype, *w.shape)
        if not np.isfinite(w).all():
            raise QuantizerError(f"the {w.shape[0]}x{w.shape[1]} weight has NaN or infinite values: fix the model "
                                 f"weights before quantising")
        if t.label == UNQUANTIZED:
            return w.astype("<f2").view(np.uint8).reshape(w.shape[0], -1)
        imatrix = self._importance(importance, w.shape[1]) if self.uses_importance else None
        return self._lib.quantize(t, w, imatrix, self._pool, self.threads)

    @staticmethod
    def _importance(importance, in_features: int) -> np.ndarray | None:
        if importance is None:
            return None
        if isinstance(importance, torch.Tensor):
            importance = importance.detach().to("cpu", torch.float32).numpy()
        v = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if v.size != in_features:
            raise QuantizerError(f"importance has {v.size} values for rows of {in_features}: collect it on this "
                                 f"weight's input (one value per input column)")
        if not np.isfinite(v).all() or (v < 0).any():
            raise QuantizerError("importance has negative, NaN or infinite values: it must be a mean of squares")
        return v

    def dequantize_bytes(self, data: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
        """float32 ``(out, in)`` values of rows stored at ``qtype`` (what llama.cpp computes with)."""
        out_features, in_features = (int(s) for s in shape)
        t = self._checked(qtype, out_features, in_features)
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if data.size != out_features * t.row_bytes(in_features):
            raise QuantizerError(f"{data.size} bytes cannot hold a {out_features}x{in_features} {t.label} weight "
                                 f"({out_features * t.row_bytes(in_features)} expected)")
        data = data.reshape(out_features, -1)
        if t.label == UNQUANTIZED:
            return data.view("<f2").astype(np.float32)
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(data, GGMLQuantizationType(t.type_id)).astype(np.float32, copy=False)

    def fake_quantize(self, weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as llama.cpp will compute with it; same dtype, shape and device."""
        if weight.dim() != 2:
            raise QuantizerError(f"expected an (out, in) matrix, got shape {tuple(weight.shape)}")
        t = self._checked(qtype, *weight.shape)
        if t.label == UNQUANTIZED:
            return weight.detach().to(torch.float16).to(weight.dtype)
        w = weight.detach().to("cpu", torch.float32).contiguous().numpy()
        data = self.quantize_bytes(w, t.label, importance)
        values = self.dequantize_bytes(data, t.label, w.shape)
        return torch.from_numpy(values).to(device=weight.device, dtype=weight.dtype)


__all__ = ["GgmlQuantizer", "GgmlLibrary", "GgmlLibraryError", "LIB_ENV", "find_library", "load_library"]
