"""Many Snakemake dry runs from one process that imports Snakemake once: each is `snakemake.cli.main` (what
`python -m snakemake` runs) in a forked child, stdout and stderr to its own file, two at a time (the test machine's
two cores). A config that fails at parse time costs ~1 CPU-s to parse after ~1.2 CPU-s of interpreter start and
imports, and tests/workflow/test_bad_inputs.py makes 38 of them (`make test` budget).

    python tests/dry_runs.py SNAKEFILE OUT_DIR WORKDIR...

writes OUT_DIR/<i>.out (the i-th work dir's output) and OUT_DIR/returncodes.json ({"<i>": exit status}).
Run it as its own process (tests call it with subprocess), never forked from pytest: forking a process that runs
threads is unsafe, and this one runs none when it forks.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

PARALLEL = 2


def dry_run_in_child(snakefile: str, workdir: str, out_path: Path) -> None:
    """In a forked child: the CLI's dry run of `all` with fds 1 and 2 on `out_path`; exits with the CLI's status."""
    import snakemake.cli

    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    status = 1
    try:
        snakemake.cli.main(["-s", snakefile, "--directory", workdir, "-n", "all"])
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv: list[str]) -> None:
    snakefile, out_dir, *workdirs = argv
    import snakemake.cli  # noqa: F401  once, before the first fork: the children start with it imported

    out_dir = Path(out_dir)
    pending, running, statuses = list(enumerate(workdirs)), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            number, workdir = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                dry_run_in_child(snakefile, workdir, out_dir / f"{number}.out")
            running[pid] = number
        pid, wait_status = os.wait()
        statuses[str(running.pop(pid))] = os.waitstatus_to_exitcode(wait_status)
    (out_dir / "returncodes.json").write_text(json.dumps(statuses))


if __name__ == "__main__":
    main(sys.argv[1:])
