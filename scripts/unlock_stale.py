#!/usr/bin/env python3
"""Release the lock a killed Snakemake left in a working directory, never a live one's (`make results` runs this
before its Snakemake; a plain `snakemake --unlock` there broke the lock of a running manual `snakemake`, and the two
then deleted each other's outputs).

How Snakemake 9.27 locks (snakemake/persistence/file.py, the default file backend): once its DAG is built it writes
.snakemake/locks/<n>.input.lock and <n>.output.lock, each listing files (no process id, no host), and removes the
folder when the run ends; a killed run leaves them behind. So whether a lock is stale is a question about
processes: a live Snakemake whose working directory (its cwd, or the --directory / -d it was given) is this one
holds the lock, or is about to take it (it locks only after parsing and building the DAG). psutil (a Snakemake
dependency) lists them; a process whose working directory cannot be read (another user's) is not counted.

Exit 0: no live Snakemake here, and a stale lock, if any, was released (`snakemake --unlock`). Exit 1: a live
Snakemake runs in this directory (its pid and command are named); nothing is touched. Exit 2: the unlock failed.
A Snakemake that starts between this check and the unlock is not seen (a window of one `snakemake --unlock`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import psutil


def is_snakemake(cmdline: list[str]) -> bool:
    """`snakemake ...`, `python .../bin/snakemake ...` or `python -m snakemake ...` (also the job processes a
    Snakemake starts with `-m snakemake`, which belong to a live run too)."""
    head = cmdline[:3]
    return any(Path(word).name == "snakemake" for word in head) or any(
        a == "-m" and b == "snakemake" for a, b in zip(cmdline, cmdline[1:4]))


def working_directory(process: psutil.Process, cmdline: list[str]) -> Path:
    """Where a Snakemake works: its --directory / -d (relative to its cwd), else its cwd."""
    cwd = Path(process.cwd())
    for i, word in enumerate(cmdline):
        if word in ("--directory", "-d") and i + 1 < len(cmdline):
            return (cwd / cmdline[i + 1]).resolve()
        if word.startswith("--directory="):
            return (cwd / word.split("=", 1)[1]).resolve()
    return cwd.resolve()


def live_snakemakes(directory: Path) -> list[psutil.Process]:
    """Live Snakemake processes working in `directory` (this process and its ancestors excluded)."""
    directory = directory.resolve()
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for process in psutil.process_iter():
        if process.pid in ours:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = process.cmdline()
            if is_snakemake(cmdline) and working_directory(process, cmdline) == directory:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue  # gone, or not ours to read
    return found


def lock_files(directory: Path) -> list[Path]:
    return sorted((directory / ".snakemake" / "locks").glob("*.lock"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", default=".", help="Snakemake's working directory (default: here)")
    parser.add_argument("--snakefile", help="the Snakefile, when not the working directory's own")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    live = live_snakemakes(directory)
    if live:
        for process in live:
            print(f"unlock_stale: a Snakemake is running in {directory.resolve()} (pid {process.pid}: "
                  f"{' '.join(process.cmdline())[:200]}); not unlocking. Wait for it to finish, or stop it.",
                  file=sys.stderr)
        return 1
    locks = lock_files(directory)
    if not locks:
        return 0
    command = [sys.executable, "-m", "snakemake", "--unlock", "--directory", str(directory)]
    if args.snakefile:
        command += ["--snakefile", args.snakefile]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"unlock_stale: `{' '.join(command)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}",
              file=sys.stderr)
        return 2
    print(f"unlock_stale: released the stale lock of a Snakemake that is no longer running "
          f"({', '.join(p.name for p in locks)} in {directory.resolve() / '.snakemake' / 'locks'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
