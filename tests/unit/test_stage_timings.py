"""scripts/stage_timings.py: the per-stage time table `make results` ends with."""
import importlib.util
from pathlib import Path

from helpers import REPO

SCRIPT = REPO / "scripts" / "stage_timings.py"


def load():
    spec = importlib.util.spec_from_file_location("stage_timings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(path: Path, seconds: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t10.0\n")


def test_seconds_are_summed_per_stage(tmp_path, capsys):
    timings = load()
    bench(tmp_path / "b" / "eval" / "base" / "id.tsv", 1.5)
    bench(tmp_path / "b" / "seed-0" / "eval" / "sft-4" / "ood.tsv", 2.25)
    bench(tmp_path / "b" / "seed-0" / "sft" / "sft.tsv", 4.0)
    bench(tmp_path / "b" / "seed-1" / "sft" / "sft.tsv", 6.0)  # a stage's jobs summed over the replicates
    assert timings.stage_seconds(tmp_path / "b") == {"eval": (2, 3.75), "sft": (2, 10.0)}
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "x.snakemake.log").write_text("...\nElapsed time: 0:12:34.5\n")
    assert timings.main(["--benchmarks", str(tmp_path / "b"), "--logs", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "13.8" in out and "0:12:34.5" in out
    assert timings.main(["--benchmarks", str(tmp_path / "none")]) == 1
