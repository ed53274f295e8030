"""The package's layout is its architecture (docs/architecture.md): wings by concern, no import
circles, and entrypoints that start without torch.

Imports are read from the source (the AST of every module), function-level imports included:
a circle hidden inside a function still ties two modules into one, and still breaks when the
import order changes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("nanogpt", "hydra_plugins/nanogpt_launchers")

# What each part of the package may import, besides its own modules (docs/architecture.md). A wing
# is a subpackage of nanogpt/; a top-level module is a part of its own. The entrypoints (train,
# sample, bench, prepare) and cli.py, the command line they share, may import anything.
FOUNDATION = {"nanogpt", "nanogpt.errors", "nanogpt.config"}
MAY_IMPORT = {
    "nanogpt.errors": set(),
    "nanogpt.config": {"nanogpt.errors"},
    "nanogpt.model": set(),
    "nanogpt.optim": FOUNDATION,
    "nanogpt.data": FOUNDATION,
    "nanogpt.parallel": FOUNDATION,
    "nanogpt.evals": FOUNDATION | {"nanogpt.model", "nanogpt.data"},
    "nanogpt.runs": FOUNDATION | {"nanogpt.model", "nanogpt.data", "nanogpt.parallel", "nanogpt.evals"},
    "nanogpt.sweeps": FOUNDATION | {"nanogpt.data", "nanogpt.parallel", "nanogpt.runs"},
    "hydra_plugins.nanogpt_launchers": FOUNDATION | {"nanogpt.parallel", "nanogpt.runs", "nanogpt.sweeps"},
}
ENTRYPOINTS = ("train", "sample", "evaluate", "bench", "prepare")  # Hydra's: they answer --cfg job and --help
PLAIN_ENTRYPOINTS = ("gpu_check", "sweeps.dashboard")  # argparse's: they answer --help
HEAVY = ("torch", "numpy", "tiktoken", "wandb", "submitit", "matplotlib", "datasets", "optuna", "mlflow", "tensorboard",
         "lm_eval")


def modules(root: Path) -> dict[str, Path]:
    """Every module under root's packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(root: Path) -> dict[str, dict[str, int]]:
    """module -> {project module it imports: line of the first such import}, at any depth."""
    known = modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        graph[name] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from package import module` imports the module; `from module import name` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:  # import a.b.c of a module: a.b.c, else its package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Each group of modules that import each other, directly or through others (Tarjan's
    strongly connected components, of more than one module), as one path around it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(_path_around(graph, set(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _path_around(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    return paths[node] + [start]
                if target in group and target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return sorted(group)


def part(module: str) -> str:
    """The part of the package a module belongs to: its wing, or itself at the top."""
    pieces = module.split(".")
    if pieces[0] == "hydra_plugins":
        return "hydra_plugins.nanogpt_launchers"
    return ".".join(pieces[:2])


def describe(graph: dict[str, dict[str, int]], path: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


def test_no_import_circles():
    graph = imports(REPO)
    assert len(graph) > 30, "the walk found too few modules: is the package where PACKAGES says?"
    found = circles(graph)
    assert not found, "import circles (function-level imports included): " + "; ".join(describe(graph, c) for c in found)


def test_each_wing_imports_only_what_sits_below_it():
    graph = imports(REPO)
    wrong = []
    for module, targets in graph.items():
        allowed = MAY_IMPORT.get(part(module))
        if allowed is None:  # an entrypoint or cli.py
            assert part(module).removeprefix("nanogpt.") in (*ENTRYPOINTS, *PLAIN_ENTRYPOINTS, "cli", "nanogpt"), (
                f"{module} belongs to no part of the layout: add it to MAY_IMPORT (and docs/architecture.md)")
            continue
        for target, line in targets.items():
            if part(target) != part(module) and part(target) not in allowed:
                wrong.append(f"{module} imports {target} (line {line})")
    assert not wrong, ("imports against the layout of docs/architecture.md (a wing imports only what sits below "
                       "it; nothing but an entrypoint imports an entrypoint): " + "; ".join(wrong))


def test_the_circle_finder_finds_a_circle_hidden_in_a_function(tmp_path):
    """The test above would pass on a finder that finds nothing: it must see a circle that a
    function-level import closes, and name the path and lines."""
    (tmp_path / "nanogpt" / "runs").mkdir(parents=True)
    (tmp_path / "hydra_plugins" / "nanogpt_launchers").mkdir(parents=True)
    (tmp_path / "nanogpt" / "__init__.py").write_text("")
    (tmp_path / "nanogpt" / "runs" / "__init__.py").write_text("")
    (tmp_path / "nanogpt" / "runs" / "a.py").write_text("from nanogpt.runs import b\n")
    (tmp_path / "nanogpt" / "runs" / "b.py").write_text("import os\n\n\ndef f():\n    from . import c\n")
    (tmp_path / "nanogpt" / "runs" / "c.py").write_text("def g():\n    import nanogpt.runs.a\n")
    (tmp_path / "nanogpt" / "runs" / "d.py").write_text("from nanogpt.runs.a import x\n")  # into the circle, not on it
    graph = imports(tmp_path)
    assert circles(graph) == [["nanogpt.runs.a", "nanogpt.runs.b", "nanogpt.runs.c", "nanogpt.runs.a"]]
    assert describe(graph, circles(graph)[0]) == ("nanogpt.runs.a (line 1) -> nanogpt.runs.b (line 5) -> "
                                                  "nanogpt.runs.c (line 2) -> nanogpt.runs.a")


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS + PLAIN_ENTRYPOINTS)
def test_cfg_job_and_help_import_no_heavy_library(entrypoint):
    """`--cfg job` and `--help` answer at once: no torch, numpy, tiktoken, ... is imported."""
    flag_sets = [["--cfg", "job"], ["--help"]] if entrypoint in ENTRYPOINTS else [["--help"]]
    code = (
        "import contextlib, io, sys\n"
        f"import nanogpt.{entrypoint} as entry\n"
        f"for flags in {flag_sets!r}:\n"
        f"    sys.argv = ['nanogpt-{entrypoint}', *flags]\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            entry.main()\n"
        "        except SystemExit as e:\n"
        "            assert not e.code, f'{flags} exited with {e.code}'\n"
        f"    loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "    assert not loaded, f'{flags} imported {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
