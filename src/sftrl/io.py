"""Atomic file output: a rule's output appears whole or not at all, so an interrupted job never leaves a
half-written file that Snakemake (or a human) could mistake for a result. Also the small readers every command
shares (JSON lines, the --settings JSON)."""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the result the permissions a plain open() or
    mkdir() would, so results stay readable by collaborators on a shared cluster file system."""
    os.chmod(tmp, mode & ~_umask())


def _scratch_dir(path: Path) -> Path:
    """A new private directory `.{name}.<random>` beside `path`, after removing the ones a writer of `path` killed
    before publishing left behind (kill -9 runs no cleanup; one job writes a path, so nothing else is writing them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp's names: prefix + 8 of [a-z0-9_] (tempfile._RandomNameSequence); nothing else, so the temporaries of
    # a longer sibling name (.k0.5.<random> beside k0) are never taken for this path's
    mine = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if mine.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path (named with `suffix`, default `path`'s, for writers that read the format from
    it) in a scratch directory beside `path`; on success it is renamed onto `path` (same filesystem, so `os.replace`
    is atomic). Whatever else the writer puts beside its file (safetensors' own `.tmpXXXXXX`) stays in the scratch
    directory, which is removed on error, on success, and by the next write of `path` after a kill."""
    path = Path(path)
    scratch = _scratch_dir(path)
    tmp = scratch / f"{path.stem}{suffix or path.suffix}"
    try:
        yield tmp
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` as a whole. Temporaries of `path`
    that a writer killed before publishing left behind are removed first (`_scratch_dir`)."""
    path = Path(path)
    tmp = _scratch_dir(path)
    try:
        yield tmp
        _publish(tmp, 0o777)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, record) for every non-blank line; a malformed line raises ValueError naming the file
    and its line number (blank lines count, so the number is the one an editor shows)."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})"
                                     ) from None


def read_jsonl(path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def read_json(path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def check_integer_keys(config: dict, schema: dict) -> None:
    """Raise ValueError naming the first key whose schema type is integer but whose value is a float such as 4.0.
    JSON Schema cannot tell 4.0 from 4 (both are the integer 4 there), so `save_steps: 4.0` passes validation and
    would fail hours later inside the trainer; call this right after validating the config."""
    defs = schema.get("$defs", {})

    def walk(node: dict, value, key: str) -> None:
        while "$ref" in node:
            node = defs[node["$ref"].removeprefix("#/$defs/")]
        types = node.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, float) and "integer" in types and "number" not in types:
            raise ValueError(f"config {key} = {value!r}: must be an integer, not a float (write it without '.0')")
        if isinstance(value, dict):
            for name, item in value.items():
                if name in node.get("properties", {}):
                    walk(node["properties"][name], item, f"{key}.{name}" if key else name)
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for index, item in enumerate(value):
                walk(node["items"], item, f"{key}[{index}]")

    walk(schema, config, "")


def write_csv(path, frame) -> None:
    """Write a pandas DataFrame atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def fingerprint(settings, *paths) -> str:
    """sha256 of a settings object and the bytes of some files: what a resumable state was made from. A training
    job resumes only from state with the same fingerprint; anything else is stale and is discarded."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def settings(text: str) -> dict:
    """argparse type of every --settings option: one JSON object (a config section)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
