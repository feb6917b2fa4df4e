"""The package layout is its architecture: layers that only import downwards, no import cycle,
mergekit's internals known in one place, and the lab apart from the library.

Every ``import`` statement of every module is read (also those inside functions, which run
later but still bind one module to another).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Set

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mergekit_safety")

#: layers, lowest first: a module may import its own layer and the layers below it
LAYERS = [
    {"mergekit_safety"},
    {"mergekit_safety.engine"},
    {"mergekit_safety.fusion"},
    {"mergekit_safety.methods"},
    {"mergekit_safety.plugin"},
    # applications and kept public paths (re-exports of moved modules)
    {"mergekit_safety.cli", "mergekit_safety.cli_data", "mergekit_safety.lab", "mergekit_safety.testbed",
     "mergekit_safety.sweep",
     "mergekit_safety._hook", "mergekit_safety.registration", "mergekit_safety.freezing"},
]
#: library modules placed at the top level that belong to the engine layer
ENGINE_LEVEL = {"mergekit_safety.judge", "mergekit_safety.prompt_sets"}
#: the only modules that import mergekit (the kernel reuses its sparsification library;
#: `models` merges base+adapter references with mergekit's own LoRA code)
MERGEKIT_ALLOWED = ("mergekit_safety.plugin", "mergekit_safety.fusion.kernel", "mergekit_safety.fusion.models")
#: applications: never imported by the library
APPLICATIONS = ("mergekit_safety.lab", "mergekit_safety.testbed", "mergekit_safety.cli", "mergekit_safety.sweep")


def _modules() -> Dict[str, str]:
    found = {}
    for folder, _dirs, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[relative[: -len(".__init__")] if relative.endswith(".__init__") else relative] = path
    return found


MODULES = _modules()


def _imports(name: str) -> Set[str]:
    """Modules (ours and external top-level names) that module ``name`` imports."""
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read())
    package = name if MODULES[name].endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in MODULES else base)
    return out


def _ours(names: Set[str]) -> Set[str]:
    resolved = set()
    for target in names:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target.startswith("mergekit_safety"):
            resolved.add(target)
    return resolved


def _layer(name: str) -> int:
    if name in ENGINE_LEVEL:
        return 1
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


GRAPH = {name: _ours(_imports(name)) - {name} for name in MODULES}


def upward_imports(graph) -> list:
    return sorted(
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(name)
    )


def import_cycles(graph) -> list:
    # parent packages are imported implicitly with any submodule; only explicit edges count
    state: Dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" → ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_layers_only_import_downwards():
    upward = upward_imports(GRAPH)
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    cycles = import_cycles(GRAPH)
    assert not cycles, "\n".join(cycles)


def test_the_checks_find_what_they_look_for():
    # the two situations issue 11 removed: core ↔ checks (a cycle) and a library module
    # importing a method (upward)
    graph = {
        "mergekit_safety.fusion.kernel": {"mergekit_safety.plugin.checks"},
        "mergekit_safety.plugin.checks": {"mergekit_safety.fusion.kernel"},
        "mergekit_safety.engine.data": {"mergekit_safety.methods.somf.method"},
    }
    assert import_cycles(graph) == [
        "mergekit_safety.fusion.kernel → mergekit_safety.plugin.checks → mergekit_safety.fusion.kernel"
    ]
    assert len(upward_imports(graph)) == 2  # kernel → plugin, engine → methods


def test_only_the_glue_imports_mergekit():
    offenders = sorted(
        name for name in MODULES
        if not name.startswith(MERGEKIT_ALLOWED)
        and not name.startswith(APPLICATIONS)
        and any(t == "mergekit" or t.startswith("mergekit.") for t in _imports(name))
    )
    assert not offenders, offenders


def test_the_library_never_imports_the_applications():
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if not name.startswith(APPLICATIONS) and name not in LAYERS[-1]
        for target in targets
        if target.startswith(APPLICATIONS)
    )
    assert not offenders, offenders

