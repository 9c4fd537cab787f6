"""results/SUMMARY.md (sftrl.report.summary): the headline table from a small synthetic evaluation table and selection,
exactly; later stages keyed by stage; links relative to the summary's folder."""
import re
from pathlib import Path

import pandas as pd
import pytest

from sftrl import checkpoint
from sftrl.cli import main
from sftrl.evaluation.select import select_sft
from sftrl.report.summary import write_summary

# checkpoint name -> (ID solved, OOD solved, ID format-error rate, OOD format-error rate), 20 problems per split
MEASURED = {"base": (2, 1, 0.5, 0.6), "sft-10": (8, 6, 0.1, 0.2), "sft-20": (12, 4, 0.0, 0.25),
            "sft-30": (15, 3, 0.0, 0.125)}


def eval_table(path, measured=MEASURED, run="t"):
    """measured keys: (stage, step) of base / sft rows, or a checkpoint name (a later stage's run)."""
    rows = []
    for name, (id_ok, ood_ok, id_fmt, ood_fmt) in measured.items():
        for split, ok, fmt in (("id", id_ok, id_fmt), ("ood", ood_ok, ood_fmt)):
            rows.append({"run": run, **checkpoint.Checkpoint.parse(name).to_json(), "split": split, "n": 20,
                         "successes": ok, "accuracy": ok / 20, "first_attempt_accuracy": ok / 40, "format_error_rate": fmt,
                         "mean_reward": 0.0, "attempts": 40})
    pd.DataFrame(rows).sample(frac=1, random_state=1).to_csv(path, index=False)  # row order must not matter
    return path


@pytest.fixture
def results(tmp_path):
    """A results folder laid out as the workflow's: tables/eval.csv, sft/selection.json, figs/*.{png,pdf}."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "figs").mkdir()
    table = eval_table(tmp_path / "tables" / "eval.csv")
    select_sft(table, tmp_path / "sft" / "selection.json")
    for stem in ("fig1", "drift"):
        for ext in (".png", ".pdf"):
            (tmp_path / "figs" / f"{stem}{ext}").write_bytes(b"x")
    return tmp_path


HEADLINE = """\
| checkpoint | model | ID accuracy | OOD accuracy | ID format errors | OOD format errors |
|---|---|---|---|---|---|
| Base | `base` | 10.0 % (2/20) | 5.0 % (1/20) | 50.0 % | 60.0 % |
| Inter_SFT | `sft-10` | 40.0 % (8/20) | 30.0 % (6/20) | 10.0 % | 20.0 % |
| End_SFT | `sft-30` | 75.0 % (15/20) | 15.0 % (3/20) | 0.0 % | 12.5 % |
"""


def test_headline_table_and_links(results):
    out = results / "SUMMARY.md"
    main(["summary", "--seeds", "0", "--eval-table", str(results / "tables" / "eval.csv"),
          "--selection", str(results / "sft" / "selection.json"),
          "--figures", str(results / "figs" / "fig1.png"), str(results / "figs" / "drift.png"), "--out", str(out),
          "--html", str(results / "tables" / "headline.html")])
    text = out.read_text()
    assert text.startswith("# sftrl study summary: run `t`\n")
    assert HEADLINE in text
    assert "| PPO" not in text and "OOD recovery" not in text  # no RL run in the table: no such rows or column
    assert "- [fig1](figs/fig1.png): ID and OOD accuracy along SFT (paper Figure 1) ([PDF](figs/fig1.pdf))" in text
    assert "- [drift](figs/drift.png): " in text
    assert "- [eval.csv](tables/eval.csv)" in text and "- [selection.json](sft/selection.json)" in text
    assert "20 ID problems, 20 OOD problems" in text
    assert "tie rule" not in text
    page = (results / "tables" / "headline.html").read_text()
    assert ("<tr><td>Inter_SFT</td><td>sft-10</td><td>40.0 % (8/20)</td><td>30.0 % (6/20)</td><td>10.0 %</td>"
            "<td>20.0 %</td></tr>") in page
    assert len(re.findall(r"<tr[ >]", page)) == 1 + 3 + 1 + 8  # headline header + rows, eval.csv header + rows


def test_degenerate_selection_is_said(tmp_path):
    flat = {"base": (1, 1, 0.0, 0.0), "sft-10": (3, 0, 0.0, 0.0), "sft-20": (5, 0, 0.0, 0.0)}
    table = eval_table(tmp_path / "eval.csv", flat)
    select_sft(table, tmp_path / "selection.json")
    text = write_summary(table, tmp_path / "selection.json", [], [], tmp_path / "SUMMARY.md")
    assert "| Inter_SFT | `sft-10` | 15.0 % (3/20) | 0.0 % (0/20) |" in text
    assert "Inter_SFT is step 10 by the tie rule alone" in text


def test_a_later_stage_gets_its_last_checkpoint_and_the_recovery(tmp_path):
    # two RL runs: each gets the row of its last evaluated checkpoint
    measured = {**MEASURED, "ppo-from-sft-30-u50": (10, 4, 0.0, 0.0), "ppo-from-sft-30-u100": (13, 5, 0.05, 0.0),
                "grpo-from-sft-10-u100": (9, 6, 0.0, 0.0)}
    table = eval_table(tmp_path / "eval.csv", measured)
    select_sft(table, tmp_path / "selection.json")
    text = write_summary(table, tmp_path / "selection.json", [], [], tmp_path / "SUMMARY.md")
    # Inter_SFT OOD 30 %, End_SFT 15 %, RL end 25 %: (25 - 15) / (30 - 15) = 2/3 of the drop regained
    assert ("| checkpoint | model | ID accuracy | OOD accuracy | ID format errors | OOD format errors "
            "| OOD recovery |\n") in text
    assert "| End_SFT | `sft-30` | 75.0 % (15/20) | 15.0 % (3/20) | 0.0 % | 12.5 % |  |" in text
    assert ("| PPO from SFT step 30, update 100 | `ppo-from-sft-30-u100` | 65.0 % (13/20) | 25.0 % (5/20) | 5.0 % "
            "| 0.0 % | 66.7 % |") in text
    assert "| GRPO from SFT step 10, update 100 | `grpo-from-sft-10-u100` |" in text
    assert "update 50" not in text


def test_bad_tables_are_named(tmp_path):
    table = eval_table(tmp_path / "eval.csv")
    select_sft(table, tmp_path / "selection.json")
    two_runs = pd.concat([pd.read_csv(table), pd.read_csv(table).assign(run="other")])
    two_runs.to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(ValueError, match=r"two.csv .*runs \['other', 't'\]"):
        write_summary(tmp_path / "two.csv", tmp_path / "selection.json", [], [], tmp_path / "S.md")
    pd.read_csv(table).drop(columns="format_error_rate").to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(ValueError, match="format_error_rate"):
        write_summary(tmp_path / "old.csv", tmp_path / "selection.json", [], [], tmp_path / "S.md")
    unknown = pd.read_csv(table)
    unknown.loc[0, "stage"] = "dpo"
    unknown.to_csv(tmp_path / "unknown.csv", index=False)
    with pytest.raises(ValueError, match="dpo"):
        write_summary(tmp_path / "unknown.csv", tmp_path / "selection.json", [], [], tmp_path / "S.md")


# ------------------------------------------------------------------------------------------------------------------
# seeds: one seed writes what the one-run code wrote; several write each seed's headline

FROZEN = Path(__file__).parents[1] / "data" / "summary_one_seed"
WITH_RL = {**MEASURED, "ppo-from-sft-30-u50": (10, 4, 0.0, 0.0), "ppo-from-sft-30-u100": (13, 5, 0.05, 0.0)}


def seed_folder(root, measured=WITH_RL):
    """A seed's results folder as the workflow lays it out: tables/eval.csv, sft/selection.json."""
    (root / "tables").mkdir(parents=True)
    table = eval_table(root / "tables" / "eval.csv", measured)
    select_sft(table, root / "sft" / "selection.json")
    return table, root / "sft" / "selection.json"


def test_one_seed_writes_what_the_one_run_code_wrote(results):
    """SUMMARY.md and headline.html byte for byte as the code before seeds wrote them (frozen under
    tests/data/summary_one_seed, made by ba90eed's summary.py on this very folder)."""
    table, selection = seed_folder(results / "run")
    main(["summary", "--seeds", "5", "--eval-table", str(table), "--selection", str(selection),
          "--figures", str(results / "figs" / "fig1.png"), str(results / "figs" / "drift.png"),
          "--tables", str(results / "tables" / "claims.csv"),
          "--out", str(results / "SUMMARY.md"), "--html", str(results / "tables" / "headline.html")])
    assert (results / "SUMMARY.md").read_text() == (FROZEN / "SUMMARY.md").read_text()
    assert (results / "tables" / "headline.html").read_text() == (FROZEN / "headline.html").read_text()


def test_several_seeds_each_get_their_headline(tmp_path):
    measured = {1: WITH_RL, 4: {**WITH_RL, "sft-10": (8, 2, 0.1, 0.2), "sft-20": (12, 7, 0.0, 0.25)}}
    paths = {seed: seed_folder(tmp_path / f"seed-{seed}", m) for seed, m in measured.items()}
    main(["summary", "--seeds", "4", "1", "--eval-table", *(str(paths[s][0]) for s in (4, 1)),
          "--selection", *(str(paths[s][1]) for s in (4, 1)), "--tables", str(tmp_path / "tables" / "claims.csv"),
          "--out", str(tmp_path / "SUMMARY.md"), "--html", str(tmp_path / "tables" / "headline.html")])
    text = (tmp_path / "SUMMARY.md").read_text()
    assert text.startswith("# sftrl study summary: run `t`, seeds 4, 1\n")
    assert "## Headline\n" not in text and "[claims.md](tables/claims.md)" in text
    one, four = text.index("## Headline, seed 1\n"), text.index("## Headline, seed 4\n")
    assert four < one < text.index("## Figures")  # in the order of --seeds
    # each seed's own selection: seed 4's Inter_SFT is step 20 (OOD 7/20), seed 1's step 10
    assert "| Inter_SFT | `sft-20` | 60.0 % (12/20) | 35.0 % (7/20) |" in text[four:one]
    assert "| Inter_SFT | `sft-10` | 40.0 % (8/20) | 30.0 % (6/20) |" in text[one:]
    assert text.count("| PPO from SFT step 30, update 100 |") == 2 and text.count("Accuracy: share") == 2
    for seed in (4, 1):
        assert f"- [eval.csv](seed-{seed}/tables/eval.csv)" in text
        assert f"- [selection.json](seed-{seed}/sft/selection.json)" in text
    page = (tmp_path / "tables" / "headline.html").read_text()
    assert "<title>sftrl headline: run t, seeds 4, 1</title>" in page
    headings = re.findall(r"<h2>([^<]*)</h2>", page)
    assert headings == ["Headline, seed 4", "Headline, seed 1", f"Evaluation table, seed 4 ({paths[4][0]})",
                        f"Evaluation table, seed 1 ({paths[1][0]})"]
    assert "<tr><td>Inter_SFT</td><td>sft-20</td>" in page and "<tr><td>Inter_SFT</td><td>sft-10</td>" in page


def test_one_file_per_seed_or_a_clear_error(tmp_path, capsys):
    table, selection = seed_folder(tmp_path / "seed-0")
    with pytest.raises(SystemExit) as err:
        main(["summary", "--seeds", "0", "1", "--eval-table", str(table), "--selection", str(selection),
              "--out", str(tmp_path / "SUMMARY.md")])
    assert err.value.code == 2
    assert "--eval-table gives 1 path(s) for 2 --seeds (0 1): one per seed" in capsys.readouterr().err
    assert not (tmp_path / "SUMMARY.md").exists()


def test_a_bad_seed_table_is_named(tmp_path):
    good, selection = seed_folder(tmp_path / "seed-0")
    bad, bad_selection = seed_folder(tmp_path / "seed-1")
    pd.read_csv(bad).assign(run="other").pipe(lambda t: pd.concat([pd.read_csv(good), t])).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))} with {re.escape(str(bad_selection))}: .*runs"):
        write_summary([good, bad], [selection, bad_selection], [], [], tmp_path / "S.md", seeds=[0, 1])
