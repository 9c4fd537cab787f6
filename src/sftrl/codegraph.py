"""Which library files a CLI command runs: the static import graph of `sftrl`, from the source, at parse time.

The workflow lists these files as each rule's inputs, so editing a module reruns exactly the rules whose command
imports it (directly or transitively) and what depends on them — a new import can never be forgotten, as a
hand-kept list could. Static (stdlib `ast`, no module is executed, no torch): imports inside functions count too,
since the lazy imports of a command are code it runs. Why not stdlib modulefinder: it follows every third-party
import too (torch, transformers: seconds of scanning at every parse) and reports files, not our package's modules;
we need only `sftrl`'s own edges, so the few lines below resolve them.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "sftrl"
ROOT = Path(__file__).resolve().parent  # src/sftrl


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """src/sftrl/a/b.py or src/sftrl/a/b/__init__.py for `sftrl.a.b`; None if it is not a module of the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:  # relative: from the importer's package, `level` steps up
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    # `from X import a`: X itself, and X.a where a is a submodule
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


@functools.lru_cache(maxsize=None)
def direct_imports(module: str, root: Path = ROOT) -> frozenset[str]:
    """The package modules `module` imports anywhere in its source (module level or inside functions)."""
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"{module} is not a module of {PACKAGE} under {root}")
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= {m for m in _resolve(module, path.name == "__init__.py", node) if module_file(m, root)}
    return frozenset(found - {module})


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(modules, root: Path = ROOT) -> list[str]:
    """Every package module that importing `modules` runs, transitively (parent packages included), sorted."""
    seen: set[str] = set()
    todo = [p for m in modules for p in _with_parents(m)]
    while todo:
        module = todo.pop()
        if module in seen or module_file(module, root) is None:
            continue
        seen.add(module)
        todo += [p for m in direct_imports(module, root) for p in _with_parents(m)]
    return sorted(seen)


def files(modules, root: Path = ROOT) -> list[Path]:
    return [module_file(m, root) for m in closure(modules, root)]
