"""The shipped base: the embedded base model trained once, longer than the DAG's time budget allows, and kept in the
repository (`resources/base/`, ≤ 20 MB) with a manifest of its files' sha256 and the exact `base` settings that
made it. Config `base.shipped` names it; the DAG then installs it (rule pretrain_base) instead of pretraining, after
checking that every file matches the manifest and that the config's `base` section is the one the manifest records,
so a shipped model can never silently stand for a different config. `base.shipped: null` pretrains from the same
settings instead (the regeneration path).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from ..io import atomic_dir, atomic_path, read_json, write_json

MANIFEST = "MANIFEST.json"
LOSS_LOG = "pretrain_loss.csv"
MAX_BYTES = 20 * 1024 * 1024  # the repository's budget for shipped weights
# `base` keys that do not change the weights: where the copy lives, and how the probe tests it.
NOT_WEIGHT_SETTINGS = ("shipped", "probe")


def weight_settings(settings: dict) -> dict:
    """The part of config `base` that determines the pretrained weights (`continuation: null` is the same as no
    continuation key: bases shipped before the key existed keep matching)."""
    return {key: value for key, value in settings.items()
            if key not in NOT_WEIGHT_SETTINGS and not (key == "continuation" and value is None)}


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_listed_files(directory: Path, files: dict, label: str, remedy: str) -> None:
    """Every file a manifest lists ({name: {"sha256": ...}}) is in `directory` with its recorded sha256; a missing or
    changed one raises naming it (`label`: what the directory is; `remedy`: how to mend it)."""
    for name, recorded in files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"{label}: {name} is listed in {MANIFEST} but missing")
        if sha256(path) != recorded["sha256"]:
            raise ValueError(f"{label}: {name} does not match its sha256 in {MANIFEST} (modified or truncated; "
                             f"{remedy})")


def _flat(tree: dict, prefix: str = "base") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def ship(model_dir, loss_log, out_dir, settings: dict, notes: dict | None = None) -> dict:
    """Copy a pretrained base (HF dir + its loss log) to `out_dir` with a manifest; refuse more than MAX_BYTES."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    total = sum(p.stat().st_size for p in files) + Path(loss_log).stat().st_size
    if total > MAX_BYTES:
        raise ValueError(f"{model_dir}: {total / 2**20:.1f} MiB is over the {MAX_BYTES / 2**20:.0f} MiB budget for "
                         "a shipped base")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    with atomic_dir(out_dir) as tmp:
        for path in files:
            shutil.copyfile(path, tmp / path.name)
        shutil.copyfile(loss_log, tmp / LOSS_LOG)
        manifest = {
            "format": 1,
            "settings": weight_settings(settings),
            "files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                      for p in sorted(tmp.iterdir())},
            "code_commit": commit,
            "notes": notes or {},
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def verify(shipped_dir) -> dict:
    """The manifest, after checking that every file it lists is present with its recorded sha256 (and no weight
    file is unlisted); a mismatch raises naming the file."""
    shipped_dir = Path(shipped_dir)
    manifest_path = shipped_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"config base.shipped = {str(shipped_dir)!r}: no {MANIFEST} there")
    manifest = read_json(manifest_path)
    check_listed_files(shipped_dir, manifest["files"], f"shipped base {shipped_dir}",
                       "git checkout it, or regenerate with base.shipped: null")
    unlisted = sorted(p.name for p in shipped_dir.iterdir()
                      if p.is_file() and p.name != MANIFEST and p.name not in manifest["files"])
    if unlisted:
        raise ValueError(f"shipped base {shipped_dir}: file(s) {unlisted} are not in {MANIFEST}")
    return manifest


def install(shipped_dir, settings: dict, out_dir, loss_log) -> dict:
    """Verify the shipped base against its manifest and the config, then copy it to `out_dir` (atomically)."""
    manifest = verify(shipped_dir)
    wanted, made = _flat(weight_settings(settings)), _flat(manifest["settings"])
    differing = sorted(key for key in wanted.keys() | made.keys() if wanted.get(key) != made.get(key))
    if differing:
        first = differing[0]
        raise ValueError(
            f"config {first} = {json.dumps(wanted.get(first))} but the shipped base at {shipped_dir} was made with "
            f"{json.dumps(made.get(first))} ({len(differing)} differing key(s): {differing}). Either restore the "
            f"settings {MANIFEST} records, or set base.shipped: null to pretrain from this config (hours on CPU)")
    shipped_dir = Path(shipped_dir)
    with atomic_dir(out_dir) as tmp:
        for name in manifest["files"]:
            if name != LOSS_LOG:
                shutil.copyfile(shipped_dir / name, tmp / name)
    with atomic_path(loss_log) as tmp:
        shutil.copyfile(shipped_dir / LOSS_LOG, tmp)
    return manifest


# -----------------------------------------------------------------------------
# command line (sftrl ship-base): make resources/base from a pretrained model (done once, by hand)


def command(parser):
    from ..io import settings

    parser.add_argument("--model", required=True, help="a pretrained base model dir (results/models/base)")
    parser.add_argument("--loss-log", required=True, help="its pretraining loss log")
    parser.add_argument("--settings", type=settings, required=True, help="JSON of the config base section that made it")
    parser.add_argument("--abilities", help="its probe results (abilities.json), recorded in the manifest's notes")
    parser.add_argument("--probe-curve", help="JSON list of its probes along pretraining (one point per snapshot: "
                                              "rule reading json / own prefix, copying the hand), recorded in the "
                                              "manifest's notes")
    parser.add_argument("--out", required=True, help="where to ship it (resources/base)")

    def run(args):
        notes = {"abilities": read_json(args.abilities)} if args.abilities else {}
        if args.probe_curve:
            notes["probe_curve"] = read_json(args.probe_curve)
        manifest = ship(args.model, args.loss_log, args.out, args.settings, notes)
        print(f"shipped {len(manifest['files'])} files, {sum(f['bytes'] for f in manifest['files'].values())} bytes "
              f"-> {args.out}")

    return run
