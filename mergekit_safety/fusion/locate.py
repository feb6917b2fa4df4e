"""Config-only use of data-driven methods: compute the artifact a merge config needs.

A data-driven method (Antidote, SSAH, SOMF) needs an artifact (masks, scores, logits)
computed from the models and calibration data named in its YAML parameters. Two paths
produce it, through the same function so they always agree:

* ``mergekit-safety locate CONFIG.yml`` — reads the config, computes, writes;
* plain ``mergekit-yaml CONFIG.yml out/`` — the method's kernel, at the first tensor, finds
  the artifact missing and computes it (once per process, under a file lock, atomically).

An artifact records what it was computed from (model fingerprints, the method's locate
settings, sha256 of each data file). An existing artifact whose record differs from what the
config asks for is **stale** and is refused with a message saying how to recompute it; it is
never silently used. ``mask: auto`` (the default of locating methods) names the artifact by
the content hash of that record in a cache folder (``MERGEKIT_SAFETY_CACHE``, default
``~/.cache/mergekit-safety``), so changing the data or the settings simply makes a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from mergekit_safety.fusion.artifacts import (
    ArtifactError,
    ArtifactMetadata,
    ModelIdentity,
    file_sha256,
    open_artifact,
    write_artifact,
)
from mergekit_safety.fusion.models import cache_folder, resolve_model
from mergekit_safety.fusion.settings import AUTO, FusionSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocateRequest:
    """Everything a locate step may use: models and the merge's resolved parameters."""

    method: str
    base: Any  # mergekit ModelReference (or a path string)
    experts: Tuple[Any, ...]
    parameters: Mapping[str, Any]  # global (shared) parameters, scalars
    expert_parameters: Mapping[Any, Mapping[str, Any]] = field(default_factory=dict)
    #: further model references named by parameters (e.g. ``unaligned_model``), by name
    models: Mapping[str, Any] = field(default_factory=dict)

    def fuse_arguments(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~mergekit_safety.fusion.kernel.fuse` for the merge's own
        plain fusion (backbone settings, per-model weights and densities in expert order)."""
        p = self.parameters

        def per_expert(name: str, default: float) -> list:
            values = [self.expert_parameters.get(e, {}).get(name) for e in self.experts]
            return [default if value is None else float(value) for value in values]

        return dict(
            backbone=p.get("backbone") or "task_arithmetic",
            weights=per_expert("weight", 1.0),
            densities=per_expert("density", 1.0),
            lambda_=float(p.get("lambda", 1.0)),
            normalize=p.get("normalize"),
            rescale=p.get("rescale"),
            int8_mask=bool(p.get("int8_mask", False)),
            ties_selection=p.get("ties_selection") or "mergekit",
        )

    def model_path(self, model: Any) -> str:
        """Local directory of a plain model reference (LoRA references: see resolve_model)."""
        return resolve_model(model)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


class Locator:
    """Mixin for methods with a locate step. Subclasses declare their parameters in
    ``settings`` (a :class:`~mergekit_safety.fusion.settings.FusionSettings` subclass; what
    is recorded in an artifact is derived from it) and implement :meth:`compute_artifact`."""

    settings: type = FusionSettings
    #: whether the artifact depends on the experts (SSAH's unit scores depend on θ_A only)
    binds_experts: bool = True

    @property
    def locate_parameters(self) -> Tuple[str, ...]:
        """YAML parameters that change the artifact (recorded as its settings)."""
        return self.settings.locate_fields()

    @property
    def data_parameters(self) -> Tuple[str, ...]:
        """YAML parameters that name data files (their sha256 is recorded)."""
        return self.settings.data_fields()

    @property
    def expert_locate_parameters(self) -> Tuple[str, ...]:
        """Per-model YAML parameters that change the artifact."""
        return self.settings.expert_locate_fields()

    @property
    def model_parameters(self) -> Tuple[str, ...]:
        """YAML parameters that name further models (fingerprinted)."""
        return self.settings.model_fields_()

    # ---- to implement

    def compute_artifact(self, request: LocateRequest) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Return (tensors by artifact key, extra metadata)."""
        raise NotImplementedError

    # ---- shared

    def resolved(self, request: LocateRequest) -> LocateRequest:
        """The request with preset-controlled parameters filled from the preset."""
        import dataclasses

        resolve = getattr(self.settings, "resolve", None)
        if resolve is None:
            return request
        return dataclasses.replace(request, parameters=resolve(dict(request.parameters)))

    def locate_description(self, request: LocateRequest) -> str:
        """One line: what the locate step computes and roughly how long it takes."""
        return "computing its artifact from the models and data (one calibration pass; minutes on a CPU)"

    def artifact_record(self, request: LocateRequest) -> ArtifactMetadata:
        request = self.resolved(request)
        settings = {name: _jsonable(request.parameters.get(name)) for name in self.locate_parameters}
        if self.expert_locate_parameters:
            settings["experts"] = [
                {name: _jsonable(request.expert_parameters.get(e, {}).get(name)) for name in self.expert_locate_parameters}
                for e in request.experts
            ]
        data = {}
        for name in self.data_parameters:
            path = request.parameters.get(name)
            if not path or path == AUTO:
                continue  # 'auto' data is made from the models and other data, both recorded
            if not os.path.isfile(path):
                raise ArtifactError(
                    f"{request.method}: data file {name}={path!r} not found (resolved to "
                    f"{os.path.abspath(path)}; relative paths resolve from the working directory)"
                )
            data[name] = file_sha256(path)
        models = {}
        for name in self.model_parameters:
            reference = request.models.get(name) or request.parameters.get(name)
            if reference:
                models[name] = ModelIdentity.of(reference)
        return ArtifactMetadata(
            method=request.method,
            base=ModelIdentity.of(request.base),
            experts=tuple(ModelIdentity.of(e) for e in request.experts) if self.binds_experts else (),
            settings=settings,
            data=data,
            binds_experts=self.binds_experts,
            models=models,
        )

    def artifact_path(self, request: LocateRequest, record: Optional[ArtifactMetadata] = None) -> str:
        path = request.parameters.get("mask") or AUTO
        if path != AUTO:
            return path
        record = record or self.artifact_record(request)
        identity = json.dumps(
            {k: v for k, v in record.to_strings().items() if k not in ("extra",)}, sort_keys=True
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        return os.path.join(cache_folder(), "artifacts", f"{request.method}-{digest}.safetensors")

    def check_current(self, path: str, record: ArtifactMetadata) -> None:
        """Refuse an artifact computed from other models, data or settings."""
        found = open_artifact(path).metadata
        problems = []
        if found.method != record.method:
            problems.append(f"it was written by method {found.method!r}, not {record.method!r}")
        if record.base and found.base and found.base.fingerprint != record.base.fingerprint:
            problems.append(f"base model differs ({found.base.ref} → {record.base.ref})")
        if sorted(e.fingerprint for e in found.experts) != sorted(e.fingerprint for e in record.experts):
            problems.append(
                f"experts differ ({[e.ref for e in found.experts]} → {[e.ref for e in record.experts]})"
            )
        # keys an older version recorded but this one no longer does (e.g. an execution-only
        # setting) do not make the artifact stale; keys it lacks do
        for key in sorted(record.settings):
            if found.settings.get(key) != record.settings.get(key):
                problems.append(f"setting {key}: {found.settings.get(key)!r} → {record.settings.get(key)!r}")
        for key in sorted(set(found.models) | set(record.models)):
            old, new = found.models.get(key), record.models.get(key)
            if (old and old.fingerprint) != (new and new.fingerprint):
                problems.append(f"model {key} differs ({old.ref if old else None} → {new.ref if new else None})")
        for key in sorted(set(found.data) | set(record.data)):
            if found.data.get(key) != record.data.get(key):
                problems.append(f"data {key} changed (sha256 differs)")
        if problems:
            raise ArtifactError(
                f"{path} is stale for this merge: " + "; ".join(problems)
                + ". Recompute it with `mergekit-safety locate CONFIG.yml --force`, delete it, "
                "or use `mask: auto`."
            )

    def locate(self, request: LocateRequest, force: bool = False) -> str:
        """Make sure the artifact for ``request`` exists and is current; return its path."""
        record = self.artifact_record(request)
        path = self.artifact_path(request, record)
        with _path_lock(path):
            if os.path.exists(path) and not force:
                self.check_current(path, record)
                return path
            logger.info("%s: computing %s", request.method, path)
            resolved = self.resolved(request)
            layout = self.artifact_layout(resolved)
            if layout is not None:
                # streamed: each tensor goes to disk as it is computed (peak memory: one tensor)
                from mergekit_safety.fusion.artifacts import StreamingArtifactWriter

                with StreamingArtifactWriter(path, layout, record) as writer:
                    extra = self.stream_artifact(resolved, writer)
                    writer.commit(extra)
            else:
                tensors, extra = self.compute_artifact(resolved)
                record.extra = {**record.extra, **extra}
                write_artifact(path, tensors, record)
        return path

    def artifact_layout(self, request: LocateRequest):
        """``[(key, dtype, shape), ...]`` in writing order when the artifact is streamed by
        :meth:`stream_artifact`; None (default) for :meth:`compute_artifact`'s dict."""
        return None

    def stream_artifact(self, request: LocateRequest, writer) -> Dict[str, Any]:
        """Write the tensors of :meth:`artifact_layout` in order; return the extra metadata."""
        raise NotImplementedError


_thread_locks: Dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _path_lock(path: str):
    """One computation per artifact: a thread lock plus an advisory file lock (processes)."""
    absolute = os.path.abspath(path)
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(absolute, threading.Lock())
    os.makedirs(os.path.dirname(absolute), exist_ok=True)
    with lock:
        try:
            with open(absolute + ".lock", "a+") as handle:
                try:
                    import fcntl

                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                except ImportError:  # pragma: no cover - non-POSIX
                    pass
                try:
                    yield
                finally:
                    try:
                        import fcntl

                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                    except ImportError:  # pragma: no cover
                        pass
        finally:
            # also after a failed computation: a lock file left behind looks like a stale run
            with contextlib.suppress(OSError):
                os.unlink(absolute + ".lock")
