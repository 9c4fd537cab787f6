"""The study report on the shared micro run: `snakemake --report` builds one self-contained HTML file without
running a job, every figure the DAG produced is embedded (the very bytes) with its caption, the key tables are in it
grouped by stage, and results/SUMMARY.md links only to files that exist. (The real-browser check is
`make report-check`: installing Chromium is kept out of `make test`.)"""
import base64
import html
import json
import re
from pathlib import Path

import pytest
from helpers import REPO, snakemake

pytestmark = pytest.mark.workflow

CAPTIONS = REPO / "workflow" / "report"
# figure stem -> its report category (the stage it belongs to)
FIGURE_CATEGORIES = {"fig1": "3. SFT and evaluation", "fig2": "3. SFT and evaluation",
                     "base_abilities": "2. Base model", "fig3": "4. Spectral analysis",
                     "fig4": "4. Spectral analysis", "fig4_layers": "4. Spectral analysis",
                     "embed_lmhead": "4. Spectral analysis", "drift": "5. Rotation drift",
                     "fig1b": "3b. RL", "recovery_window": "3b. RL",
                     "fig5": "6. Restoration", "fig6": "6. Restoration", "fig7": "6. Restoration"}
# a replicate's tables (results/seed-0/) and the shared / across-seed ones (results/)
TABLES = [f"seed-0/{path}" for path in (
    "tables/eval.csv", "sft/selection.json", "tables/sft_loss.csv", "tables/spectral_sigma.csv",
    "tables/spectral_angles.csv", "tables/spectral_energy.csv", "tables/embed_lmhead.csv", "tables/drift.csv",
    "tables/drift_correlation.json", "tables/rl_log.csv", "tables/restore_rank.csv", "tables/restore_layer.csv",
    "tables/restore_reverse.csv")] + ["base/abilities.json", "SUMMARY.md", "tables/headline.html", "tables/claims.csv"]


def embedded(report: str, name: str):
    """A JSON object the report's app reads (`var results = {...};`)."""
    match = re.search(rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', report, re.S)
    assert match, f"no `var {name}` in the report"
    return json.loads(match.group(1))


def text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", markup)).split())  # (inline tags: no space)


def caption_fragments(rst: str) -> list[str]:
    """The literal text of a caption file between its template expressions, as rendered (inline markup dropped)."""
    plain = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", "\0", rst).replace("``", "").replace("*", "")
    return [" ".join(part.split()) for part in plain.split("\0") if len(part.split()) >= 3]


@pytest.fixture(scope="module")
def report(micro_run, micro_snakefile, tmp_path_factory):
    """`snakemake --report` of the completed micro run, with the mtime of every result before and after."""
    results = micro_run / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    path = tmp_path_factory.mktemp("report") / "report.html"
    log = snakemake(micro_run, "--cores", "2", "--report", str(path), "--report-stylesheet",
                    str(REPO / "workflow" / "report" / "style.css"), snakefile=micro_snakefile, timeout=300)  # as `make report` does
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    return path.read_text(encoding="utf-8"), log.stdout + log.stderr, before, after


def test_report_runs_no_job(report):
    _, log, before, after = report
    assert before == after, "snakemake --report changed or created files under results/"
    assert "Finished job" not in log and "Report created" in log


def test_every_figure_is_embedded_with_its_caption(micro_run, report):
    html_text, _, _, _ = report
    results, categories = embedded(html_text, "results"), embedded(html_text, "categories")
    figures = sorted((micro_run / "results" / "figs").glob("*.png"))
    assert {f.stem for f in figures} == set(FIGURE_CATEGORIES), "the micro DAG's figures changed: update this test"
    for figure in figures:
        key = f"results/figs/{figure.name}"
        assert key in results, f"{key} is not in the report"
        entry = results[key]
        assert entry["mime_type"] == "image/png"
        data = entry["data_uri"]
        assert data.startswith("data:image/png")
        assert base64.b64decode(data.split("base64,", 1)[1]) == figure.read_bytes()
        assert key in categories[FIGURE_CATEGORIES[figure.stem]]["Figures"]
        caption = text(entry["caption"])
        assert "System Message" not in caption, f"{figure.stem}.rst does not parse: {caption[:300]}"
        for fragment in caption_fragments((CAPTIONS / f"{figure.stem}.rst").read_text()):
            assert fragment in caption, f"caption of {figure.name} lacks {fragment!r}"
        assert "Paper counterpart" in caption or "No paper counterpart" in caption
    # the PDFs stay out (a browser needs a viewer for them); the PNG stands for each figure
    assert not [key for key in results if key.endswith(".pdf")]


def test_tables_and_front_page(report):
    html_text, _, _, _ = report
    results = embedded(html_text, "results")
    for table in TABLES:
        assert f"results/{table}" in results, f"results/{table} is not in the report"
        assert results[f"results/{table}"]["caption"], f"results/{table} has no caption"
    # the headline renders inline (an HTML result), with the run's own numbers
    headline = results["results/tables/headline.html"]
    assert headline["mime_type"] == "text/html"
    page = base64.b64decode(headline["data_uri"].split("base64,", 1)[1]).decode()
    assert "<td>Inter_SFT</td>" in page and "<td>End_SFT</td><td>sft-8</td>" in page
    front = text(json.loads(re.search(r'<script id="workflow-desc">\s*var workflow_desc = (.*?);\s*</script>',
                                      html_text, re.S).group(1)))
    assert "sftrl study report: run micro" in front and "How to read this report" in front
    assert "System Message" not in front
    # the run's configuration closes the front page; each rule's provenance comes with the report
    assert "verify_iter: 2" in front and "top_r: 24" in front and "pairs: [['base', 'end_sft']" in front
    rules = embedded(html_text, "rules")
    assert {"eval_checkpoint", "sft", "svd", "summary"} <= set(rules)


def test_summary_links_resolve(micro_run):
    summary = micro_run / "results" / "SUMMARY.md"
    body = summary.read_text()
    links = re.findall(r"\]\(([^)]+)\)", body)
    assert links and all((summary.parent / link).is_file() for link in links), \
        [link for link in links if not (summary.parent / link).is_file()]
    linked = {Path(link).name for link in links}
    assert {f.name for f in (micro_run / "results" / "figs").glob("*.p*")} <= linked  # every PNG and PDF
    assert {"eval.csv", "selection.json"} <= linked
    for label in ("| Base | `base` |", "| Inter_SFT | `sft-", "| End_SFT | `sft-8` |"):
        assert label in body


def where(ckpt: str) -> str:
    """The folder below results/ (and logs/) of a checkpoint's files: the base's are shared, the others replicate 0's."""
    return "" if ckpt == "base" else "seed-0/"


def test_long_jobs_log_a_progress_bar_and_end_with_one_summary_line(micro_run):
    """Pretraining, SFT, every evaluation and every SVD: a tqdm bar in the log, and its last line says what the job
    wrote and how long it took."""
    logs = micro_run / "logs"
    expected = {  # log -> (progress bar prefix, the last line's pattern)
        "base/pretrain.log": ("pretrain: 100%", r"pretrained 30 steps .* -> results/models/base, .* in \d+ s$"),
        "seed-0/sft/sft.log": ("100%|", r"SFT: 8 steps, checkpoints at steps \[4, 8\] -> results/seed-0/sft, .* in \d+ s$"),
        # one job per checkpoint, both splits: a bar and a summary line each, the OOD one last (the shared base's
        # logs directly under logs/, a replicate's under logs/seed-<s>/)
        **{f"{where(ckpt)}eval/{ckpt}.log": ("eval ood: 100%", rf"eval \S+ on ood: accuracy .* -> "
                                            rf"results/{where(ckpt)}eval/{ckpt}/ood.jsonl, .* in [\d.]+ s$")
           for ckpt in ("base", "sft-4", "sft-8")},
        **{f"{where(ckpt)}svd/{ckpt}/{shard}.log": (
            "svd: 100%", rf"SVD shard results/{where(ckpt)}svd/{ckpt}/{shard}.safetensors: .* in [\d.]+ s$")
           for ckpt in ("base", "sft-4", "sft-8") for shard in ("embed", "layers000-001")},
    }
    for ckpt in ("base", "sft-4", "sft-8"):
        log = (logs / f"{where(ckpt)}eval" / f"{ckpt}.log").read_text()
        assert "eval id: 100%" in log and re.search(
            rf"eval \S+ on id: accuracy .* -> results/{where(ckpt)}eval/{ckpt}/id.jsonl", log)
    for name, (bar, last) in expected.items():
        lines = [line for line in re.split(r"[\r\n]", (logs / name).read_text()) if line.strip()]
        assert any(bar in line for line in lines), f"logs/{name}: no progress bar"
        assert re.search(last, lines[-1]), f"logs/{name} ends with {lines[-1]!r}"
