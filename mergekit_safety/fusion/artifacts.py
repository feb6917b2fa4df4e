"""Mask and score artifacts: safetensors files with metadata, written atomically, read lazily.

Every data-driven method writes its result (masks, logits, scores) as one safetensors file:

* tensors are named ``<role>/<weight name>`` for values shared by all experts, or
  ``<role>@<expert index>/<weight name>`` for per-expert values (index into ``experts``);
  a weight with no tensor of a role is left alone by that role (e.g. all-keep);
* metadata (strings only, safetensors' rule) records the format and its version, the method
  that wrote it, the fingerprints of the models it was computed for, the settings and the
  hashes of the calibration data. A reader checks the fingerprints against the models it is
  asked to merge and refuses an artifact made for other models.

Writes go to a temporary file in the destination folder and are renamed into place, so an
interrupted write never leaves a file that looks complete. Only safetensors are ever read:
no pickle is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

from mergekit_safety.engine.checkpoint import safetensors_files
from mergekit_safety.engine.data import file_sha256  # noqa: F401  (part of this module's API)

FORMAT = "mergekit-safety/artifact"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact file is missing, unreadable, foreign or made for other models/settings."""


# --------------------------------------------------------------------------- fingerprints

_SAMPLES_PER_FILE = 8
_SAMPLE_BYTES = 4096
_fingerprint_cache: Dict[tuple, str] = {}
_fingerprint_lock = threading.Lock()


def _file_fingerprint(path: str, digest: "hashlib._Hash") -> None:
    """Header (names, dtypes, shapes, offsets) + size + evenly spaced content samples."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise ArtifactError(f"{path}: not a safetensors file (truncated header)")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > size - 8:
            raise ArtifactError(f"{path}: not a safetensors file (bad header length)")
        digest.update(handle.read(header_length))
        digest.update(str(size).encode())
        data_start = 8 + header_length
        span = max(size - data_start - _SAMPLE_BYTES, 0)
        for sample in range(_SAMPLES_PER_FILE):
            handle.seek(data_start + (span * sample) // max(_SAMPLES_PER_FILE - 1, 1))
            digest.update(handle.read(_SAMPLE_BYTES))


def directory_fingerprint(directory: str) -> str:
    """A cheap content fingerprint of a model (or adapter) directory of safetensors files.

    Reads each file's header and a few small content samples, so two different fine-tunes
    of one architecture get different fingerprints without reading whole checkpoints.
    Cached per process by (path, size, mtime) of the files.
    """
    directory = os.path.abspath(directory)
    files = safetensors_files(directory)
    if not files:
        raise ArtifactError(f"{directory}: no .safetensors weights to fingerprint")
    key = tuple((path, os.path.getsize(path), os.stat(path).st_mtime_ns) for path in files)
    with _fingerprint_lock:
        cached = _fingerprint_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.basename(path).encode())
        _file_fingerprint(path, digest)
    value = digest.hexdigest()[:32]
    with _fingerprint_lock:
        _fingerprint_cache[key] = value
    return value


def model_fingerprint(model: Any) -> str:
    """Fingerprint of a mergekit ``ModelReference``, a ``base+adapter`` string or a path.

    A model that is not a local directory (a hub id) is fingerprinted by its name only,
    since this package never downloads anything.
    """
    text = str(model)
    base, _, adapter = text.partition("+")
    parts = []
    for part in (base, adapter):
        if not part:
            continue
        path = part.split("@")[0]
        if os.path.isdir(path):
            parts.append(directory_fingerprint(path))
        else:
            parts.append("name:" + part)
    return "+".join(parts)


# --------------------------------------------------------------------------- data hashes


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ModelIdentity:
    ref: str
    fingerprint: str

    @classmethod
    def of(cls, model: Any) -> "ModelIdentity":
        return cls(ref=str(model), fingerprint=model_fingerprint(model))


@dataclass
class ArtifactMetadata:
    method: str
    base: Optional[ModelIdentity] = None
    experts: Sequence[ModelIdentity] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # True when the values depend on the experts (the merge must use exactly these experts);
    # False for e.g. SSAH unit masks computed on the aligned model alone.
    binds_experts: bool = True
    # further models the values depend on (e.g. an unaligned model), by parameter name
    models: Mapping[str, ModelIdentity] = field(default_factory=dict)

    def to_strings(self) -> Dict[str, str]:
        def identity(value: Optional[ModelIdentity]):
            return None if value is None else {"ref": value.ref, "fingerprint": value.fingerprint}

        strings = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "base": json.dumps(identity(self.base)),
            "experts": json.dumps([identity(e) for e in self.experts]),
            "binds_experts": json.dumps(self.binds_experts),
            "settings": json.dumps(dict(self.settings), sort_keys=True),
            "data": json.dumps(dict(self.data), sort_keys=True),
            "extra": json.dumps(dict(self.extra), sort_keys=True),
        }
        if self.models:  # written only when present: older artifacts keep their identity
            strings["models"] = json.dumps({k: identity(v) for k, v in sorted(self.models.items())})
        return strings

    @classmethod
    def from_strings(cls, values: Mapping[str, str], path: str) -> "ArtifactMetadata":
        if values.get("format") != FORMAT:
            raise ArtifactError(
                f"{path}: not a mergekit-safety artifact (metadata 'format' is "
                f"{values.get('format')!r}, expected {FORMAT!r})"
            )
        version = values.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ArtifactError(
                f"{path}: artifact format version {version} is not supported by this "
                f"mergekit-safety (reads version {FORMAT_VERSION}); recompute it"
            )
        try:
            base = json.loads(values["base"])
            experts = json.loads(values["experts"])
            return cls(
                method=values["method"],
                base=None if base is None else ModelIdentity(**base),
                experts=tuple(ModelIdentity(**e) for e in experts),
                settings=json.loads(values["settings"]),
                data=json.loads(values["data"]),
                extra=json.loads(values.get("extra", "{}")),
                binds_experts=json.loads(values.get("binds_experts", "true")),
                models={k: ModelIdentity(**v) for k, v in json.loads(values.get("models", "{}")).items()},
            )
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{path}: malformed artifact metadata ({error})") from error


def tensor_key(role: str, weight_name: str, expert_index: Optional[int] = None) -> str:
    if expert_index is None:
        return f"{role}/{weight_name}"
    return f"{role}@{expert_index}/{weight_name}"


# --------------------------------------------------------------------------- writing


def write_artifact(path: str, tensors: Mapping[str, Any], metadata: ArtifactMetadata) -> None:
    """Write tensors + metadata atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=".tmp-" + os.path.basename(path) + "-", suffix=".partial", dir=folder
    )
    os.close(handle)
    try:
        contiguous = {name: value.contiguous() for name, value in tensors.items()}
        save_file(contiguous, temporary, metadata=metadata.to_strings())
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        # mkstemp makes the file private (0600); an artifact is an ordinary file (shared caches)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


_SAFETENSORS_DTYPES = {
    "torch.bool": ("BOOL", 1), "torch.uint8": ("U8", 1), "torch.int8": ("I8", 1), "torch.int16": ("I16", 2),
    "torch.int32": ("I32", 4), "torch.int64": ("I64", 8), "torch.float16": ("F16", 2),
    "torch.bfloat16": ("BF16", 2), "torch.float32": ("F32", 4), "torch.float64": ("F64", 8),
}


class StreamingArtifactWriter:
    """Writes an artifact tensor by tensor, so a large one never sits whole in memory.

    The tensors' names, dtypes and shapes are declared up front (``layout``, in writing order),
    which fixes every offset of the safetensors file; each tensor's bytes go to disk as soon as
    it is written. The header — which also carries metadata known only at the end (``extra``)
    — is written last, into space reserved at the start. Atomic like :func:`write_artifact`:
    a temporary file in the destination folder, fsync, rename; nothing is left on failure.
    """

    #: header bytes reserved beyond the layout's own, for the metadata written at the end
    RESERVE = 1 << 16

    def __init__(self, path: str, layout: Sequence[tuple], metadata: ArtifactMetadata):
        import math

        self.path = os.path.abspath(path)
        self.metadata = metadata
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        self.entries = []
        offset = 0
        for key, dtype, shape in layout:
            code, size = _SAFETENSORS_DTYPES[str(dtype)]
            length = size * math.prod(shape)
            self.entries.append((key, dtype, tuple(int(s) for s in shape), code, offset, offset + length))
            offset += length
        self.header_size = len(self._header({})) + self.RESERVE
        self.header_size += (-self.header_size) % 8  # data starts 8-byte aligned
        handle, self.temporary = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(self.path) + "-",
                                                  suffix=".partial", dir=folder)
        self.file = os.fdopen(handle, "wb")
        self.file.seek(8 + self.header_size)
        self.position = 0

    def _header(self, extra: Mapping[str, Any]) -> bytes:
        metadata = dataclasses.replace(self.metadata, extra={**self.metadata.extra, **extra})
        header: Dict[str, Any] = {"__metadata__": metadata.to_strings()}
        for key, _dtype, shape, code, start, end in self.entries:
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [start, end]}
        return json.dumps(header, separators=(",", ":")).encode()

    def write(self, key: str, tensor) -> None:
        expected_key, dtype, shape, _code, start, end = self.entries[self.position]
        if key != expected_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {expected_key} {dtype} {list(shape)} next, got "
                             f"{key} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch_uint8()).numpy().tobytes()
        if len(data) != end - start:
            raise ValueError(f"{self.path}: {key} has {len(data)} bytes, expected {end - start}")
        self.file.write(data)
        self.position += 1

    def commit(self, extra: Optional[Mapping[str, Any]] = None) -> None:
        if self.position != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self.position} declared tensors were not written")
        header = self._header(extra or {})
        if len(header) > self.header_size:
            raise ValueError(f"{self.path}: metadata larger than the reserved header ({len(header)} > {self.header_size})")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.header_size))
        self.file.write(header + b" " * (self.header_size - len(header)))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.temporary, 0o666 & ~umask)
        os.replace(self.temporary, self.path)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.temporary):
            os.unlink(self.temporary)

    def __enter__(self) -> "StreamingArtifactWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None or os.path.exists(self.temporary):
            self.abort()


def torch_uint8():
    import torch

    return torch.uint8


# --------------------------------------------------------------------------- reading


class Artifact:
    """A lazily read artifact: the header is parsed once, tensors are read on demand."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise ArtifactError(f"mask artifact not found: {path} (resolved to {self.path})")
        try:
            self._handle = safe_open(self.path, framework="pt", device="cpu")
            raw_metadata = self._handle.metadata() or {}
            self._keys = frozenset(self._handle.keys())
        except ArtifactError:
            raise
        except Exception as error:  # safetensors raises its own error types
            raise ArtifactError(
                f"{path}: unreadable artifact (truncated or not safetensors): {error}"
            ) from error
        self.metadata = ArtifactMetadata.from_strings(raw_metadata, path)
        self._lock = threading.Lock()

    def keys(self) -> Iterable[str]:
        return self._keys

    def has(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str):
        with self._lock:
            return self._handle.get_tensor(key)

    def shape(self, key: str) -> tuple:
        with self._lock:
            return tuple(self._handle.get_slice(key).get_shape())

    def expert_index(self, model: Any) -> int:
        """Index of ``model`` among the artifact's experts, matched by content fingerprint."""
        fingerprint = model_fingerprint(model)
        for index, expert in enumerate(self.metadata.experts):
            if expert.fingerprint == fingerprint:
                return index
        raise ArtifactError(
            f"{self.path}: was computed for experts "
            f"{[e.ref for e in self.metadata.experts]}, not for {model} "
            f"(no expert with fingerprint {fingerprint}); recompute it for these models"
        )

    def check_models(self, base: Any, experts: Sequence[Any]) -> None:
        """Refuse an artifact computed for another base model or other experts."""
        meta = self.metadata
        if meta.base is not None:
            fingerprint = model_fingerprint(base)
            if fingerprint != meta.base.fingerprint:
                raise ArtifactError(
                    f"{self.path}: was computed for base model {meta.base.ref} "
                    f"(fingerprint {meta.base.fingerprint}), but the merge's base_model is "
                    f"{base} (fingerprint {fingerprint}); recompute it for these models"
                )
        if meta.binds_experts and meta.experts:
            wanted = sorted(e.fingerprint for e in meta.experts)
            given = sorted(model_fingerprint(m) for m in experts)
            if wanted != given:
                raise ArtifactError(
                    f"{self.path}: was computed for experts {[e.ref for e in meta.experts]}, "
                    f"but the merge uses {[str(m) for m in experts]} (the weights differ); "
                    "recompute it for these models"
                )


_open_artifacts: Dict[tuple, Artifact] = {}
_open_lock = threading.Lock()


def open_artifact(path: str) -> Artifact:
    """Open (once per process and file version) an artifact; thread-safe."""
    absolute = os.path.abspath(path)
    try:
        stat = os.stat(absolute)
    except FileNotFoundError:
        raise ArtifactError(
            f"mask artifact not found: {path} (resolved to {absolute}; relative paths in a "
            "merge YAML are resolved from the working directory mergekit runs in)"
        ) from None
    key = (absolute, stat.st_size, stat.st_mtime_ns)
    with _open_lock:
        artifact = _open_artifacts.get(key)
        if artifact is None:
            artifact = Artifact(absolute)
            _open_artifacts[key] = artifact
        return artifact
