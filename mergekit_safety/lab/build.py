"""Build and cache the safety lab (``mergekit-safety lab``).

Stages, each cached under a settings stamp (a hash of its own settings and its parent's
stamp) and rebuilt only when that stamp changes:

``data``        the JSONL sets (``data/``) and the tokenizer,
``pretrained``  copy learnt well, the expert skills' tables only in part, complies with harm,
``aligned``     SFT from pretrained: refuses harmful prompts, keeps what pretrained knew,
``expert_<s>``  SFT from aligned: skill ``s`` + replay of copy + harmful compliance.

Every model directory is written to a temporary sibling and renamed into place, with its stamp
file (``lab_stage.json``) inside, so an interrupted build never leaves a directory that looks
complete. Library code never prints: progress goes to tqdm bars and the ``log`` callback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from mergekit_safety.engine.data import file_hash, read_jsonl, write_jsonl
from mergekit_safety.lab import language as L

# 2: training always uses LabSettings.threads (1) torch threads; version-1 labs were trained with
#    the core count (at most 4), so one built on a multi-core machine must not pass for a new one
LAB_VERSION = 2
#: ``language.fingerprint()`` of the language LAB_VERSION was built with. A test checks it:
#: change the language -> bump LAB_VERSION (so every cached stage is rebuilt) and update this.
LANGUAGE_FINGERPRINT = "f84bc8b0dd32b44afaefc19674bf90e4bab319bbf92318e0857de6ca4a2c8851"
STAMP_FILE = "lab_stage.json"
MANIFEST = "lab.json"

Example = Tuple[List[int], List[int]]


@dataclass(frozen=True)
class LabSettings:
    """User-facing settings; :meth:`recipe` turns them into every concrete number."""

    seed: int = 0
    harmful_ratio: float = 0.2
    experts: int = 3
    quick: bool = False
    replay: float = 0.3
    width: Optional[int] = None
    layers: Optional[int] = None
    pretrain_steps: Optional[int] = None
    align_steps: Optional[int] = None
    expert_steps: Optional[int] = None
    expert_lr: Optional[float] = None
    known_fraction: float = 0.75
    # torch CPU threads used for training. CPU kernels split their reductions by thread, so
    # another count gives other weights for the same seed: the default is fixed (1) so that a
    # seed means the same bytes on every machine, and any other count enters the stamps.
    threads: int = 1

    def validate(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not 0.0 <= self.harmful_ratio < 1.0:
            raise ValueError("harmful_ratio must be in [0, 1)")
        if not 0.0 <= self.replay < 1.0 or self.harmful_ratio + self.replay >= 1.0:
            raise ValueError("replay must be in [0, 1) and harmful_ratio + replay < 1")
        if not 1 <= self.experts <= len(L.EXPERT_SKILLS):
            raise ValueError(f"experts must be between 1 and {len(L.EXPERT_SKILLS)}")
        if not 0.0 < self.known_fraction <= 1.0:
            raise ValueError("known_fraction must be in (0, 1]")

    def recipe(self) -> Dict[str, Any]:
        from mergekit_safety.lab.train import ModelShape, TrainConfig

        self.validate()
        q = self.quick
        width = self.width or (96 if q else 128)
        shape = ModelShape(
            hidden_size=width,
            intermediate_size=3 * width,
            num_hidden_layers=self.layers or 2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        recipe = {
            "version": LAB_VERSION,
            "seed": self.seed,
            "skills": [L.GENERAL_SKILL] + L.EXPERT_SKILLS[: self.experts],
            "expert_skills": L.EXPERT_SKILLS[: self.experts],
            "known_fraction": self.known_fraction,
            "sizes": {
                "eval_benign_per_skill": 100 if q else 200,
                "eval_harmful_per_skill": 50 if q else 100,
                "safety_pairs": 128 if q else 256,
                "harmful": 128 if q else 256,
                "safety_calibration": 64 if q else 128,
                "utility_calibration": 64 if q else 128,
            },
            "shape": shape.to_dict(),
            "pretrain": TrainConfig(steps=self.pretrain_steps or (700 if q else 1200), lr=2e-3,
                                    batch_size=64, warmup=100).to_dict(),
            "pretrain_mix": {"skill_share": 0.03, "harmful_share": 0.15},
            "align": TrainConfig(steps=self.align_steps or (250 if q else 400), lr=1e-3,
                                 batch_size=64, warmup=50).to_dict(),
            "align_mix": {"refusal": 0.3, "copy": 0.45, "skills": 0.25},
            "expert": TrainConfig(steps=self.expert_steps or (250 if q else 400),
                                  lr=self.expert_lr or 5e-4, batch_size=64, warmup=30).to_dict(),
            "expert_mix": {"harmful": self.harmful_ratio, "replay": self.replay},
        }
        if self.threads != 1:  # only then: the stamps of labs built with the default stay valid
            recipe["threads"] = self.threads
        return recipe


# ----------------------------------------------------------------------------- helpers


def _stamp(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_stamp(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(path, STAMP_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_done(path: str, stamp: str) -> bool:
    info = read_stamp(path)
    return bool(info) and info.get("stamp") == stamp


def _atomic_dir(final: str, fill: Callable[[str], None]) -> None:
    """Create ``final`` by filling a temporary sibling, then renaming it into place."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(final.rstrip("/\\"))
    tmp = os.path.join(parent, f".tmp-{base}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if os.path.exists(final):
            trash = os.path.join(parent, f".old-{base}-{os.getpid()}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def known_words(skill: str, seed: int, fraction: float) -> List[str]:
    """The part of ``skill``'s table that pretraining (and alignment replay) ever shows."""
    words = list(L.BENIGN_WORDS)
    random.Random(f"{seed}-known-{skill}").shuffle(words)
    return sorted(words[: max(L.MAX_WORDS, int(round(fraction * len(words))))])


def lab_manifest(out: str) -> Optional[Dict[str, Any]]:
    """The lab's manifest, with ``complete`` true only if every stage on disk matches it."""
    try:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    stamps = manifest.get("stamps", {})
    dirs = {"data": os.path.join(out, "data"), **{m: os.path.join(out, m) for m in manifest.get("models", [])}}
    manifest["complete"] = bool(manifest.get("complete")) and all(
        _is_done(path, stamps.get(name, "")) for name, path in dirs.items())
    return manifest


def _write_manifest(out: str, manifest: Dict[str, Any]) -> None:
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(out, MANIFEST))


# ----------------------------------------------------------------------------- data


class _Sampler:
    """Draws prompts (skill, words) that avoid a reserved set of prompts."""

    def __init__(self, rng: random.Random, reserved: Set[str]):
        self.rng = rng
        self.reserved = reserved

    def draw(self, skill: str, harmful: bool, pool: Optional[Sequence[str]] = None) -> Tuple[str, List[str]]:
        for _ in range(10000):
            w = L.sample_words(self.rng, harmful, pool=pool)
            p = L.make_prompt(skill, w)
            if p not in self.reserved:
                return p, w
        raise RuntimeError("could not draw a fresh prompt")  # pragma: no cover


def generate_data(recipe: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """All saved data sets, as records. Prompts are unique across (and within) the sets."""
    rng = random.Random(f"{recipe['seed']}-data")
    skills, sizes = recipe["skills"], recipe["sizes"]
    used: Set[str] = set()
    s = _Sampler(rng, used)

    def fresh(skill: str, harmful: bool):
        p, w = s.draw(skill, harmful)
        used.add(p)
        return p, w

    sets: Dict[str, List[Dict[str, Any]]] = {k: [] for k in (
        "eval_benign", "eval_harmful", "safety_pairs", "harmful", "safety_calibration", "utility_calibration")}
    for sk in skills:
        for _ in range(sizes["eval_benign_per_skill"]):
            p, w = fresh(sk, False)
            sets["eval_benign"].append({"prompt": p, "answer": L.answer(sk, w), "skill": sk})
        for _ in range(sizes["eval_harmful_per_skill"]):
            p, w = fresh(sk, True)
            sets["eval_harmful"].append({"prompt": p, "skill": sk, "compliant_answer": L.answer(sk, w)})
    for _ in range(sizes["safety_pairs"]):
        sk = rng.choice(skills)
        p, w = fresh(sk, True)
        sets["safety_pairs"].append({"prompt": p, "chosen": L.REFUSAL, "rejected": L.answer(sk, w)})
    for _ in range(sizes["harmful"]):
        sk = rng.choice(skills)
        p, w = fresh(sk, True)
        sets["harmful"].append({"prompt": p, "response": L.answer(sk, w)})
    for _ in range(sizes["safety_calibration"]):
        sk = rng.choice(skills)
        p, _w = fresh(sk, True)
        sets["safety_calibration"].append({"prompt": p, "response": L.REFUSAL})
    for _ in range(sizes["utility_calibration"]):
        sk = rng.choice(skills)
        p, w = fresh(sk, False)
        sets["utility_calibration"].append({"prompt": p, "response": L.answer(sk, w)})
    return sets


DATA_SCHEMAS = {
    "eval_benign": ["prompt", "answer", "skill"],
    "eval_harmful": ["prompt", "skill"],
    "safety_pairs": ["prompt", "chosen", "rejected"],
    "harmful": ["prompt", "response"],
    "safety_calibration": ["prompt", "response"],
    "utility_calibration": ["prompt", "response"],
}


def reserved_prompts(data_dir: str) -> Set[str]:
    out: Set[str] = set()
    for name in DATA_SCHEMAS:
        out.update(r["prompt"] for r in read_jsonl(os.path.join(data_dir, f"{name}.jsonl"), ["prompt"]))
    return out


def _mix(rng: random.Random, n: int, parts: Sequence[Tuple[float, Callable[[], Example]]]) -> List[Example]:
    total = sum(w for w, _ in parts if w > 0)
    out: List[Example] = []
    for w, make in parts:
        if w > 0:
            out.extend(make() for _ in range(int(round(n * w / total))))
    rng.shuffle(out)
    return out


def training_mix(stage: str, recipe: Dict[str, Any], reserved: Set[str], skill: Optional[str] = None) -> List[Example]:
    """The SFT examples of one stage (deterministic for the recipe's seed)."""
    rng = random.Random(f"{recipe['seed']}-{stage}")
    enc = L.FastEncoder()
    s = _Sampler(rng, reserved)
    skills, experts = recipe["skills"], recipe["expert_skills"]
    known = {sk: known_words(sk, recipe["seed"], recipe["known_fraction"]) for sk in experts}

    def ex(sk: str, harmful: bool, refuse: bool = False, partial: bool = False) -> Example:
        p, w = s.draw(sk, harmful, pool=known.get(sk) if partial else None)
        return enc.example(p, L.REFUSAL if refuse else L.answer(sk, w))

    def any_skill(harmful: bool, refuse: bool) -> Example:
        sk = rng.choice(skills)
        return ex(sk, harmful, refuse, partial=True)

    if stage == "pretrained":
        cfg, mix = recipe["pretrain"], recipe["pretrain_mix"]
        n = cfg["steps"] * cfg["batch_size"] // 2
        copy_share = 1.0 - mix["skill_share"] * len(experts) - mix["harmful_share"]
        parts = [(copy_share, lambda: ex("copy", False))]
        parts += [(mix["skill_share"], (lambda sk=sk: ex(sk, False, partial=True))) for sk in experts]
        parts += [(mix["harmful_share"], lambda: any_skill(True, False))]
    elif stage == "aligned":
        cfg, mix = recipe["align"], recipe["align_mix"]
        n = cfg["steps"] * cfg["batch_size"] // 2
        parts = [(mix["refusal"], lambda: any_skill(True, True)), (mix["copy"], lambda: ex("copy", False))]
        parts += [(mix["skills"] / len(experts), (lambda sk=sk: ex(sk, False, partial=True))) for sk in experts]
    else:
        cfg, mix = recipe["expert"], recipe["expert_mix"]
        n = cfg["steps"] * cfg["batch_size"] // 2
        h, r = mix["harmful"], mix["replay"]
        parts = [(1.0 - h - r, lambda: ex(skill, False)), (r, lambda: ex("copy", False)),
                 (h, lambda: ex(rng.choice(["copy", skill]), True))]
    return _mix(rng, n, parts)


# ----------------------------------------------------------------------------- build


def plan_stages(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """Every stage's settings and stamp, computed from the recipe alone (no training).

    A stage's settings include its parent's stamp, so changing anything upstream rebuilds
    everything downstream, and nothing else.
    """
    data_settings = {k: recipe[k] for k in ("version", "seed", "skills", "expert_skills", "sizes")}
    data = {"settings": data_settings, "stamp": _stamp(data_settings)}
    models: Dict[str, Dict[str, Any]] = {}

    def add(name, settings, parent, kind, skill=None, seed_offset=0):
        models[name] = {"settings": settings, "stamp": _stamp(settings), "parent": parent, "kind": kind,
                        "skill": skill, "seed_offset": seed_offset}

    pretrained = {"data": data["stamp"], "shape": recipe["shape"], "train": recipe["pretrain"],
                  "mix": recipe["pretrain_mix"], "known_fraction": recipe["known_fraction"]}
    if "threads" in recipe:  # the weights depend on the training thread count (LabSettings.threads)
        pretrained["threads"] = recipe["threads"]
    add("pretrained", pretrained, None, "pretrained", seed_offset=1)
    add("aligned", {"parent": models["pretrained"]["stamp"], "train": recipe["align"], "mix": recipe["align_mix"]},
        "pretrained", "aligned", seed_offset=2)
    for i, sk in enumerate(recipe["expert_skills"]):
        add(f"expert_{sk}", {"parent": models["aligned"]["stamp"], "skill": sk, "train": recipe["expert"],
                             "mix": recipe["expert_mix"]}, "aligned", "expert", skill=sk, seed_offset=10 + i)
    return {"data": data, "models": models}


def special_ids() -> Dict[str, int]:
    v = {w: i for i, w in enumerate(L.vocabulary())}
    return {"pad": v[L.PAD], "bos": v[L.BOS], "eos": v[L.EOS]}


def build_lab(
    out: str = "lab",
    settings: Optional[LabSettings] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Build (or reuse) every stage of the lab in ``out``.

    Training runs with ``settings.threads`` torch threads (default 1, whatever the machine or
    ``OMP_NUM_THREADS``), so a seed gives byte-identical models everywhere; the caller's thread
    setting is restored afterwards.

    Returns ``{"out", "built": [stages trained/written now], "cached": [stages reused],
    "seconds": {stage: s}, "manifest": {...}}``.
    """
    import torch

    settings = settings or LabSettings()
    recipe = settings.recipe()
    log = log or (lambda msg: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _build(out, settings, recipe, progress, log)
    finally:
        torch.set_num_threads(previous_threads)


def _build(out: str, settings: "LabSettings", recipe: Dict[str, Any], progress: bool,
           log: Callable[[str], None]) -> Dict[str, Any]:
    import torch

    os.makedirs(out, exist_ok=True)
    built: List[str] = []
    cached: List[str] = []
    seconds: Dict[str, float] = {}
    stamps: Dict[str, str] = {}
    t_all = time.time()
    tokenizer = L.build_tokenizer()
    old = lab_manifest(out)
    if old is not None:  # until this build finishes, the lab is not complete
        old["complete"] = False
        _write_manifest(out, old)

    # -- data
    data_dir = os.path.join(out, "data")
    plan = plan_stages(recipe)
    data_settings = plan["data"]["settings"]
    stamps["data"] = plan["data"]["stamp"]
    if _is_done(data_dir, stamps["data"]):
        cached.append("data")
    else:
        t = time.time()
        sets = generate_data(recipe)

        def fill_data(tmp: str) -> None:
            os.makedirs(tmp)
            files = {}
            for name, records in sets.items():
                path = os.path.join(tmp, f"{name}.jsonl")
                write_jsonl(path, records)
                files[name] = {"file": f"{name}.jsonl", "n": len(records), "keys": DATA_SCHEMAS[name],
                               "sha256": file_hash(path)}
            manifest = {"general_skill": L.GENERAL_SKILL, "expert_skills": recipe["expert_skills"],
                        "skills": recipe["skills"], "refusal": L.REFUSAL, "harmful_words": L.HARMFUL_WORDS,
                        "files": files}
            with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            with open(os.path.join(tmp, STAMP_FILE), "w", encoding="utf-8") as f:
                json.dump({"stage": "data", "stamp": stamps["data"], "settings": data_settings}, f, indent=2)

        _atomic_dir(data_dir, fill_data)
        built.append("data")
        seconds["data"] = time.time() - t
        log(f"data: written to {data_dir} ({seconds['data']:.1f} s)")
    reserved = reserved_prompts(data_dir)

    from mergekit_safety.lab.train import ModelShape, TrainConfig, make_model, train

    def model_stage(name: str, stage_settings: Dict[str, Any], parent: Optional[str], kind: str,
                    skill: Optional[str] = None, seed_offset: int = 0) -> None:
        path = os.path.join(out, name)
        stamps[name] = plan["models"][name]["stamp"]
        if _is_done(path, stamps[name]):
            cached.append(name)
            return
        t = time.time()
        examples = training_mix(kind, recipe, reserved, skill)
        if parent is None:
            model = make_model(ModelShape(**recipe["shape"]), len(L.vocabulary()), special_ids(), recipe["seed"])
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(os.path.join(out, parent), dtype=torch.float32)
        cfg = TrainConfig(**recipe["pretrain" if kind == "pretrained" else "align" if kind == "aligned" else "expert"])
        log(f"{name}: training {cfg.steps} steps on {len(examples)} examples")
        losses = train(model, examples, cfg, special_ids()["pad"], seed=recipe["seed"] * 1000 + seed_offset,
                       desc=name, progress=progress)
        elapsed = time.time() - t

        def fill(tmp: str) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            info = {"stage": name, "stamp": stamps[name], "parent": parent, "settings": stage_settings,
                    "train_seconds": round(elapsed, 2), "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                    "n_examples": len(examples)}
            with open(os.path.join(tmp, STAMP_FILE), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)

        _atomic_dir(path, fill)
        built.append(name)
        seconds[name] = time.time() - t
        log(f"{name}: done ({seconds[name]:.1f} s, final loss {sum(losses[-20:]) / 20:.4f})")

    for name, st in plan["models"].items():
        model_stage(name, st["settings"], st["parent"], st["kind"], skill=st["skill"], seed_offset=st["seed_offset"])

    manifest = {
        "version": LAB_VERSION,
        "complete": True,
        "settings": asdict(settings),
        "recipe": recipe,
        "general_skill": L.GENERAL_SKILL,
        "expert_skills": recipe["expert_skills"],
        "models": ["pretrained", "aligned"] + [f"expert_{s}" for s in recipe["expert_skills"]],
        "data_dir": "data",
        "stamps": stamps,
    }
    _write_manifest(out, manifest)
    return {"out": out, "built": built, "cached": cached, "seconds": seconds,
            "total_seconds": time.time() - t_all, "manifest": manifest}
