"""Which library code a CLI command runs: the static import graph of `sftrl`, from the source, at parse time, and a
hash of that code that ignores what only documents it.

Each rule depends on one code stamp per command (`write_stamp`): a small file holding the hash of its command's
module closure, rewritten only when that hash changes. So a code edit of any module reruns exactly the rules whose
command imports it (directly or transitively) and what depends on them — a new import can never be forgotten, as a
hand-kept list could — while a docstring or comment edit, a touch, a checkout or moving the project reruns nothing. Static (stdlib `ast`, no module is executed, no torch): imports inside functions count too,
since the lazy imports of a command are code it runs. Why not stdlib modulefinder: it follows every third-party
import too (torch, transformers: seconds of scanning at every parse) and reports files, not our package's modules;
we need only `sftrl`'s own edges, so the few lines below resolve them.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import NamedTuple

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
    found = set()
    for node in _read(path).imports:
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


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every docstring (a string constant as the first statement of a module, class or function body): they
    document, never compute. Comments are not in the AST at all."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def module_code(module: str, root: Path = ROOT) -> str:
    """What `module` computes, as text: its AST without docstrings, without line numbers (so a comment or a blank
    line that shifts code changes nothing), while any changed constant, default, name or statement does."""
    return _read(module_file(module, root)).code


class _Source(NamedTuple):
    imports: tuple[ast.Import | ast.ImportFrom, ...]
    code: str


def _read(path: Path) -> _Source:
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int, size: int) -> _Source:  # keyed by the file's stat: an edited file is re-read
    """A source file parsed once for both of its uses (every Snakemake parse reads the whole package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imports = tuple(node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))
    return _Source(imports, ast.dump(_strip_docstrings(tree), include_attributes=False))


def code_hash(modules, root: Path = ROOT) -> str:
    """sha256 over the code of every module in the closure of `modules`, keyed by module name, never by path: the
    same code anywhere on disk has the same hash."""
    digest = hashlib.sha256()
    for module in closure(modules, root):
        digest.update(f"{module}\n{module_code(module, root)}\n".encode())
    return digest.hexdigest()


def write_stamp(path, modules, root: Path = ROOT) -> str:
    """Write `path` (the modules' code hash and the module list) only if its content would change, atomically: its
    modification time then moves exactly when the code does, which is what Snakemake's rerun triggers compare."""
    from .io import write_text  # atomic; concurrent parses write the same text, so the last one wins harmlessly

    text = f"{code_hash(modules, root)}\n" + "".join(f"{m}\n" for m in closure(modules, root))
    path = Path(path)
    if not (path.is_file() and path.read_text() == text):
        write_text(path, text)
    return text
