"""The layering docs/architecture.md promises, checked on the code itself: every import of every module
(function-local ones too, read from the syntax tree) points down; no module imports itself back."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "slimcart"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """slimcart modules that `name` imports anywhere in its file. `from X import y` counts as importing
    X.y when that is a module, else X."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("slimcart")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("slimcart"):
                continue
            subs = {f"{mod}.{a.name}" for a in node.names} & known
            out |= subs or {mod}
            if subs and len(subs) < len(node.names):
                out.add(mod)
    return {m for m in out if m in known} - {name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_the_import_checker_sees_function_local_and_relative_imports(tmp_path):
    src = PKG / "compress" / "prune" / "steps.py"
    found = _imports("slimcart.compress.prune.steps", src, set(_modules()))
    assert {"slimcart.arch", "slimcart.compress.prune.storage", "slimcart.compress.train"} <= found
    assert "slimcart.compress.prune.structured" in found  # imported inside a method


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_layers_point_down():
    graph = _graph()
    ground = {"slimcart.contracts", "slimcart.errors", "slimcart.arch", "slimcart.bench", "slimcart.recipe",
              "slimcart.outputs", "slimcart.paths", "slimcart.hf", "slimcart.losses", "slimcart.training",
              "slimcart.parallel", "slimcart.native"}
    breaches = []
    for mod, deps in graph.items():
        for dep in deps:
            if (_under(mod, "slimcart.compress") or _under(mod, "slimcart.runtime")) and _under(dep, "slimcart.workloads"):
                breaches.append(f"{mod} -> {dep} (techniques and runtimes are blind to workloads)")
            if _under(mod, "slimcart.runtime") and (_under(dep, "slimcart.compress") or dep == "slimcart.bench"):
                breaches.append(f"{mod} -> {dep} (runtimes sit below techniques and the timing harness)")
            if _under(mod, "slimcart.workloads") and _under(dep, "slimcart.compress"):
                breaches.append(f"{mod} -> {dep} (workloads never know which technique ran)")
            if (mod in ground or _under(mod, "slimcart.models")) and not (dep in ground or _under(dep, "slimcart.models")):
                breaches.append(f"{mod} -> {dep} (the ground floor imports only the ground floor)")
    assert not breaches, "\n".join(sorted(breaches))


def test_contracts_import_nothing_of_slimcart_but_errors():
    assert _graph()["slimcart.contracts"] <= {"slimcart.errors"}
