"""The static import graph (sftrl.codegraph) the workflow derives each rule's code inputs from, and the CLI command
table (sftrl.cli.COMMANDS) it starts from: every command names a real function, and the light commands stay
torch-free."""
import argparse
import importlib
import subprocess
import sys
import textwrap

import pytest

from sftrl import cli
from sftrl.codegraph import ROOT, closure, code_hash, direct_imports, files, module_file, write_stamp

# Commands that must run without torch (figures, tables, the selection, collecting CSVs, dealing problem sets):
# they run on login nodes and in Snakemake's own environment, and importing torch would cost seconds each.
TORCH_FREE_COMMANDS = ["data eval-set", "table", "select", "spectral-collect", "restore-table", "claims"] + \
    [c for c in cli.COMMANDS if c.startswith("figure ")]
TORCH_FREE_MODULES = ["sftrl.checkpoint", "sftrl.codegraph", "sftrl.cli", "sftrl.weights.names", "sftrl.weights.stored",
                      "sftrl.restore.spec",
                      "sftrl.config_checks"]


def write_package(root, sources: dict):
    """A throwaway package tree: {relative path: source}; `root` plays src/sftrl (module names are sftrl.*)."""
    for relative, source in sources.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def package(tmp_path):
    return write_package(tmp_path / "sftrl", {
        "__init__.py": "",
        "a/__init__.py": "from . import b  # a submodule\nfrom .c import helper\n",
        "a/b.py": """\
            import os

            def lazy():
                from ..d import x  # relative, inside a function
                from . import c, NOT_A_MODULE
                return x
            """,
        "a/c.py": "helper = 1\n",
        "d.py": "from sftrl.e.f import g  # absolute\nx = 1\n",
        "e/__init__.py": "",
        "e/f.py": "g = 2\nimport numpy\n",
        "lonely.py": "import json\n",
    })


def test_module_file(package):
    assert module_file("sftrl", package) == package / "__init__.py"
    assert module_file("sftrl.a", package) == package / "a" / "__init__.py"
    assert module_file("sftrl.a.b", package) == package / "a" / "b.py"
    assert module_file("sftrl.a.missing", package) is None
    assert module_file("numpy", package) is None
    assert module_file("sftrl.task.solver") == ROOT / "task" / "solver.py"


def test_direct_imports(package):
    # `from . import b` in a package's __init__ is the submodule sftrl.a.b; `from .c import helper` is sftrl.a.c
    assert direct_imports("sftrl.a", package) == {"sftrl.a.b", "sftrl.a.c"}
    # relative imports inside a function count; `from . import c` resolves to the submodule, a plain name
    # (NOT_A_MODULE) and third-party modules (os) are not package modules
    assert direct_imports("sftrl.a.b", package) == {"sftrl.d", "sftrl.a", "sftrl.a.c"}
    assert direct_imports("sftrl.d", package) == {"sftrl.e.f"}
    assert direct_imports("sftrl.e.f", package) == set()
    with pytest.raises(ValueError, match="sftrl.nope is not a module"):
        direct_imports("sftrl.nope", package)


def test_closure_follows_imports_and_parent_packages(package):
    assert closure(["sftrl.d"], package) == ["sftrl", "sftrl.d", "sftrl.e", "sftrl.e.f"]
    assert closure(["sftrl.a.b"], package) == ["sftrl", "sftrl.a", "sftrl.a.b", "sftrl.a.c", "sftrl.d", "sftrl.e",
                                               "sftrl.e.f"]
    assert closure(["sftrl.lonely"], package) == ["sftrl", "sftrl.lonely"]
    assert files(["sftrl.lonely"], package) == [package / "__init__.py", package / "lonely.py"]


def test_closure_of_the_real_pretrain_command():
    found = closure(["sftrl.base.pretrain"])
    for module in ("sftrl", "sftrl.base", "sftrl.base.pretrain", "sftrl.base.corpus", "sftrl.task",
                   "sftrl.task.cards", "sftrl.task.solver", "sftrl.task.prompt", "sftrl.task.verifier",
                   "sftrl.modeling", "sftrl.io"):
        assert module in found, module
    # the pretraining command does not run the SFT trainer, the SVD cache or the figures
    assert not any(m.startswith(("sftrl.train", "sftrl.weights", "sftrl.figures", "sftrl.analysis")) for m in found)
    assert all(path.is_file() for path in files(["sftrl.base.pretrain"]))


def test_relative_imports_inside_functions_in_the_real_package():
    # drift_series imports the SVD cache lazily; probe's command imports sftrl.io lazily; `from . import corpus`
    assert "sftrl.weights.svd" in direct_imports("sftrl.analysis.drift")
    assert {"sftrl.io", "sftrl.base.corpus", "sftrl.task.rollout"} <= direct_imports("sftrl.base.probe")
    assert "sftrl.weights.svd" in closure(["sftrl.analysis.drift"])


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_names_an_importable_function(command):
    target, help = cli.COMMANDS[command]
    module, function = target.split(":")
    assert cli.command_module(command) == module
    runner_factory = getattr(importlib.import_module(module), function)
    assert callable(runner_factory)
    parser = argparse.ArgumentParser(prog=f"sftrl {command}")
    assert callable(runner_factory(parser))  # it adds its arguments and returns the runner
    assert help and module_file(module) in files([module])


def test_unknown_command():
    with pytest.raises(KeyError, match="unknown sftrl command 'nope'"):
        cli.command_module("nope")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nope"])
    assert exit_.value.code == 2


def _imports_without_torch(modules: list[str], commands: list[str]) -> subprocess.CompletedProcess:
    """In a fresh interpreter: import each module (and build each command's parser), and name the first one after
    which torch is loaded."""
    script = textwrap.dedent(f"""
        import argparse, importlib, sys
        from sftrl.cli import COMMANDS
        for module in {modules!r}:
            importlib.import_module(module)
            assert "torch" not in sys.modules, f"importing {{module}} imported torch"
        for command in {commands!r}:
            module, function = COMMANDS[command][0].split(":")
            getattr(importlib.import_module(module), function)(argparse.ArgumentParser())
            assert "torch" not in sys.modules, f"command {{command}} ({{module}}) imported torch"
        print("torch-free")
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_light_modules_and_commands_do_not_import_torch():
    result = _imports_without_torch(TORCH_FREE_MODULES, TORCH_FREE_COMMANDS)
    assert result.returncode == 0 and result.stdout.strip() == "torch-free", result.stderr[-3000:]


def test_the_torch_check_can_fail():
    """The subprocess check above would notice torch: a command that does import it is reported by name."""
    result = _imports_without_torch([], ["svd"])
    assert result.returncode != 0 and "command svd (sftrl.weights.svd) imported torch" in result.stderr


# -----------------------------------------------------------------------------
# Code stamps: what a rule's jobs depend on. A docstring or comment edit must not change a command's hash (it would
# rerun a user's study); any code edit must change exactly the hashes of the commands whose closure holds the module.

LIBRARY_MODULES = sorted(p.relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                         for p in ROOT.rglob("*.py"))


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("src") / "sftrl"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _command_hashes(root):
    return {command: code_hash([cli.command_module(command)], root) for command in cli.COMMANDS}


def _edited(path, edit):
    import contextlib

    @contextlib.contextmanager
    def context():
        original = path.read_text()
        try:
            path.write_text(edit(original))
            yield
        finally:
            path.write_text(original)

    return context()


def _document_only(source: str) -> str:
    """Every docstring reworded, a comment on every line that can take one, blank lines added: no code changes."""
    import ast

    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                row = first.lineno - 1  # one more line of documentation right after the docstring opens
                quote = lines[row].lstrip()[:3]
                if quote in ('"""', "'''") and lines[row].rstrip().endswith(quote) and len(lines[row].strip()) > 6:
                    lines[row] = lines[row].rstrip()[:-3] + " (reworded)" + quote + "\n"
    return "# a new comment\n\n" + "".join(lines) + "\n# trailing comment\n"


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_a_docstring_or_comment_edit_changes_no_code_hash(package_copy, module):
    before = _command_hashes(package_copy)
    with _edited(module_file(module, package_copy), _document_only):
        assert _command_hashes(package_copy) == before


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_a_code_edit_changes_exactly_the_hashes_of_the_commands_that_import_it(package_copy, module):
    before = _command_hashes(package_copy)
    importing = {c for c in cli.COMMANDS if module in closure([cli.command_module(c)], package_copy)}
    with _edited(module_file(module, package_copy), lambda source: source + "\n_EDITED = 1\n"):
        after = _command_hashes(package_copy)
    assert {c for c in cli.COMMANDS if after[c] != before[c]} == importing


def test_a_changed_constant_or_default_changes_the_hash(package):
    (package / "lonely.py").write_text("def f(x=1):\n    return x + 2\n")
    first = code_hash(["sftrl.lonely"], package)
    for source in ("def f(x=2):\n    return x + 2\n", "def f(x=1):\n    return x + 3\n",
                   "def f(y=1):\n    return y + 2\n", "def f(x=1):\n    return x - 2\n"):
        (package / "lonely.py").write_text(source)
        assert code_hash(["sftrl.lonely"], package) != first, source
    # a docstring added, a comment, a blank line: the same code
    (package / "lonely.py").write_text('"""Doc."""\n\n\ndef f(x=1):  # why\n    """More."""\n    return x + 2\n')
    assert code_hash(["sftrl.lonely"], package) == first


def test_the_hash_does_not_depend_on_where_the_package_lives(package, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere" / "src" / "sftrl"
    shutil.copytree(package, moved)
    assert code_hash(["sftrl.a.b"], moved) == code_hash(["sftrl.a.b"], package)


def test_a_stamp_is_rewritten_only_when_its_hash_changes(package, tmp_path):
    import os

    stamp = tmp_path / "code" / "x.stamp"
    write_stamp(stamp, ["sftrl.d"], package)
    os.utime(stamp, ns=(1, 1))
    (package / "e" / "f.py").write_text("g = 2  # same code\nimport numpy\n")
    write_stamp(stamp, ["sftrl.d"], package)
    assert stamp.stat().st_mtime_ns == 1
    (package / "e" / "f.py").write_text("g = 3\nimport numpy\n")
    text = write_stamp(stamp, ["sftrl.d"], package)
    assert stamp.stat().st_mtime_ns > 1 and stamp.read_text() == text
    assert text.splitlines()[1:] == ["sftrl", "sftrl.d", "sftrl.e", "sftrl.e.f"]
