"""Bad configuration, caught when the workflow is parsed: each case is a realistic mistake in the micro config, and
a dry run must fail before any job runs, with a message that names the key (and the bad value). Library-side bad
inputs (files, model outputs, settings only a GPU node can judge) are in tests/unit/test_robustness.py."""
import json
import subprocess
import sys

import pytest
import yaml
from helpers import MICRO, REPO, env, make_workdir, snakemake

pytestmark = pytest.mark.workflow
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def setter(path: str, value):
    """An edit of the micro config: set the dotted key `path` to `value`."""
    *parents, last = path.split(".")

    def edit(config):
        section = config
        for key in parents:
            section = section[key]
        section[last] = value

    return edit


# case -> (edit, texts the error must contain)
CASES = {
    "misspelt key": (setter("sft.save_stpes", 4), ["save_stpes"]),
    # issue 28: the study replicates
    "seed listed twice": (setter("seeds", [0, 0]), ["instance['seeds']", "uniqueItems"]),
    "negative seed": (setter("seeds", [-1]), ["instance['seeds'][0]", "minimum"]),
    "no seed": (setter("seeds", []), ["instance['seeds']", "minItems"]),
    "missing model dir": (setter("model.path", "/no/such/model"), ["/no/such/model"]),
    "empty model path": (setter("model.path", ""), ["path"]),
    "integer given as float": (setter("sft.save_steps", 4.0), ["sft.save_steps", "4.0"]),
    "unreachable target": (setter("env.target", 9999), ["env.target = 9999"]),
    "target beyond the schema": (setter("env.target", 100000), ["target"]),
    "empty SFT training split": (setter("data.sft.id_test_fraction", 0.9999), ["id_test_fraction"]),
    "heads vs kv heads": (setter("base.architecture.num_kv_heads", 3), ["num_heads", "num_kv_heads"]),
    "hidden vs heads": (setter("base.architecture.num_heads", 6), ["hidden_size", "num_heads"]),
    "one SFT checkpoint": (setter("sft.save_steps", 8), ["sft.save_steps", "sft.max_steps"]),
    "missing DeepSpeed JSON": (setter("sft.deepspeed", "no/such/ds.json"), ["sft.deepspeed", "no/such/ds.json"]),
    "End_SFT not saved": (setter("selection.end_sft", 5), ["selection.end_sft", "5"]),
    "pair with itself": (setter("spectral.pairs", [["end_sft", "end_sft"]]), ["spectral.pairs"]),
    "unknown checkpoint name": (setter("spectral.pairs", [["base", "sft_40"]]), ["spectral.pairs", "sft_40"]),
    "unsaved SFT step": (setter("spectral.pairs", [["base", "sft-5"]]), ["spectral.pairs", "sft-5"]),
    "RL from an unsaved SFT step": (setter("rl.start_from", ["sft-5"]), ["rl.start_from", "sft-5"]),
    "recovery window step not saved": (setter("rl.recovery_window", [5]), ["rl.recovery_window", "5"]),
    "missing PPO DeepSpeed JSON": (setter("rl.ppo.deepspeed", "no/such/ds.json"), ["rl.ppo.deepspeed", "no/such/ds.json"]),
    "bad include regex": (setter("spectral.include", ["("]), ["spectral.include", "'('"]),
    "include selects vectors": (setter("spectral.include", [r"\.weight$"]), ["spectral.include", "norm"]),
    "angle matrix not analysed": (setter("spectral.angle_matrix", "model.layers.7.mlp.up_proj.weight"),
                                  ["spectral.angle_matrix"]),
    "sigma layer not analysed": (setter("spectral.sigma_layer", 9), ["spectral.sigma_layer"]),
    "no shipped base there": (setter("base.shipped", "no/such/base"), ["base.shipped", "no/such/base"]),
    # issue 25: found late before, known at parse time
    "NaN SFT learning rate": (setter("sft.lr", float("nan")), ["sft.lr = nan", "finite"]),
    "infinite PPO learning rate": (setter("rl.ppo.lr", float("inf")), ["rl.ppo.lr = inf", "finite"]),
    "infinite pretraining learning rate": (setter("base.train.lr", float("inf")), ["base.train.lr = inf"]),
    "top_r beyond every rank": (setter("spectral.top_r", 1000), ["spectral.top_r = 1000", "rank"]),
    "episode outgrows the context": (setter("env.verify_iter", 60),
                                     ["env.verify_iter = 60", "base.architecture.max_position_embeddings = 1024"]),
    "restored layers beyond the depth": (setter("restore.layer.layers", ["0-5"]), ["restore.layer", "'0-5'"]),
    "restored matrices match nothing": (setter("restore.rank.matrices", [r"\.mlp\.gate_projj\.weight$"]),
                                        ["restore.rank", "gate_projj"]),
    "restored count beyond every rank": (setter("restore.rank.top", [5000]), ["restore.rank.top = 5000"]),
    "reverse target update not saved": (setter("restore.reverse.target", "ppo-from-end_sft-u5"),
                                        ["restore.reverse.target", "ppo-from-end_sft-u5", "update 5"]),
    "reverse target from an unsaved SFT step": (
        setter("restore.reverse.target", "ppo-from-sft-5-u1"),
        ["restore.reverse.target", "ppo-from-sft-5-u1", "not a saved SFT step"]),
    "GRPO micro batch does not divide": (setter("rl.grpo.micro_batch_size", 3), ["rl.grpo.micro_batch_size = 3"]),
    "stop token of the shipped base not one token": (
        lambda c: c.update(base={**DEFAULT["base"]}, eval={**c["eval"], "stop_tokens": ["<|endoftext|>", "24 ="]}),
        ["eval.stop_tokens", "'24 ='", "resources/base/tokenizer.json"]),
}


@pytest.fixture(scope="module")
def case_dry_runs(request, tmp_path_factory) -> dict:
    """case -> (exit status, output) of the dry run of each selected case; tests/dry_runs.py runs them two at a time
    from one Snakemake import (a failing parse is one single-threaded process; `make test` budget)."""
    root = tmp_path_factory.mktemp("bad_config")
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.originalname == "test_bad_config_fails_at_parse_time_naming_the_key"}
    cases = [case for case in CASES if case in selected]
    workdirs = [str(make_workdir(root / f"case-{number}", edit=CASES[case][0])) for number, case in enumerate(cases)]
    outputs = root / "outputs"
    outputs.mkdir()
    subprocess.run([sys.executable, str(REPO / "tests" / "dry_runs.py"), str(REPO / "Snakefile"), str(outputs),
                    *workdirs], env=env(), check=True, timeout=600)
    statuses = json.loads((outputs / "returncodes.json").read_text())
    return {case: (statuses[str(number)], (outputs / f"{number}.out").read_text(errors="replace"))
            for number, case in enumerate(cases)}


@pytest.mark.parametrize("case", CASES)
def test_bad_config_fails_at_parse_time_naming_the_key(case_dry_runs, case):
    texts = CASES[case][1]
    returncode, output = case_dry_runs[case]
    assert returncode != 0, f"{case}: the dry run accepted it"
    assert "Job stats" not in output, f"{case}: a plan was made before failing"
    for text in texts:
        assert text in output, f"{case}: {text!r} not named in:\n{output[-2000:]}"


@pytest.mark.parametrize("kept", [["config.json"], ["config.json", "model.safetensors"]],
                         ids=["config only", "no tokenizer"])
def test_model_dir_missing_files_are_named(tmp_path, kept):
    """model.path with config.json only, or without tokenizer files: the dry run names what is missing (before:
    a transformers traceback in the first job)."""
    model = tmp_path / "model dir"
    model.mkdir()
    for name in kept:
        (model / name).symlink_to(REPO / "resources" / "base" / name)
    workdir = make_workdir(tmp_path / "work", edit=setter("model.path", str(model)))
    result = snakemake(workdir, "-n", "all", check=False, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in output
    assert str(model) in output and "tokenizer (tokenizer.json" in output, output[-2000:]
    assert ("model.safetensors" in output.split("lacks")[-1]) == ("model.safetensors" not in kept)


def test_duplicate_yaml_key_is_named(tmp_path):
    text = MICRO.read_text().replace("run: micro", "run: micro\nrun: other", 1)
    assert yaml.safe_load(text)["run"] == "other"  # what YAML alone would silently do
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(text)
    result = snakemake(tmp_path, "-n", "all", check=False, timeout=120)
    assert result.returncode != 0
    assert "duplicate key 'run'" in result.stdout + result.stderr


def test_unlock_and_rulegraph_need_no_cores(tmp_path):
    """After a killed run, `snakemake --unlock` must work as documented, without --cores."""
    workdir = make_workdir(tmp_path)
    assert "Unlock" in snakemake(workdir, "--unlock").stdout + snakemake(workdir, "--unlock").stderr
    assert "digraph" in snakemake(workdir, "--rulegraph").stdout


def test_the_shipped_base_is_installed_and_a_foreign_one_refused(tmp_path, micro_base, micro_base_settings):
    """base.shipped: rule pretrain_base installs the copy after checking its manifest against the config; a copy made
    with other settings fails the job with a message naming the differing key (the DAG never trains on it)."""
    from sftrl.base import shipped

    micro = yaml.safe_load(MICRO.read_text())
    loss = tmp_path / "loss.csv"
    loss.write_text("step,lr,loss\n1,0.003,6.9\n")
    shipped.ship(micro_base, loss, tmp_path / "shipped", micro_base_settings)  # made with the unit-test settings
    workdir = make_workdir(tmp_path / "work", edit=setter("base", {**micro_base_settings,
                                                                    "shipped": str(tmp_path / "shipped")}))
    snakemake(workdir, "--cores", "1", "results/models/base", timeout=120)
    for path in micro_base.iterdir():
        assert (workdir / "results" / "models" / "base" / path.name).read_bytes() == path.read_bytes()
    assert (workdir / "results" / "base" / "pretrain_loss.csv").read_text() == loss.read_text()
    foreign = make_workdir(tmp_path / "foreign", edit=setter("base.shipped", str(tmp_path / "shipped")))
    result = snakemake(foreign, "--cores", "1", "results/models/base", check=False, timeout=120)
    log = (foreign / "logs" / "base" / "pretrain.log").read_text()
    assert result.returncode != 0 and "but the shipped base at" in log and "base.shipped: null" in log
    assert not (foreign / "results" / "models" / "base").exists()
    assert micro["base"]["shipped"] is None  # the micro DAG itself takes the regeneration path


# ------------------------------------------------------------------------------------------------------------------
# Issue 25, item 3: paths reached the shell unquoted, so a model directory named `m$(touch PWNED)x` ran `touch` and a
# path with a space broke the command. Every {input}, {output}, {params}, {log} and {wildcards} of every rule's
# shell command is rendered with `:q`, and the launchers are argument lists. A hostile name (a space, a quote and a
# command substitution) as model.path, as base.shipped and as a DeepSpeed JSON: the jobs work and nothing runs.
# Cost: two evaluations of a tiny model, one SVD shard, one install of the shipped base, one dry run (~30 s).

HOSTILE = "m o'd$(touch PWNED)x"
RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))


def test_no_rule_puts_an_unquoted_path_in_a_shell_command():
    import re

    unquoted = [f"{smk.name}:{number}: {line.strip()}" for smk in RULES
                for number, line in enumerate(smk.read_text().splitlines(), start=1)
                if line.lstrip().startswith('"')
                and re.search(r"\{(input|output|params|log|wildcards)(\.\w+)?(:[^q}]*)?\}", line)]
    assert not unquoted, "unquoted in a shell command:\n" + "\n".join(unquoted)


def test_hostile_model_path_is_one_word_and_runs_nothing(tmp_path):
    from tiny_models import save_qwen2

    model = save_qwen2(tmp_path / HOSTILE)

    def edit(config):
        config["model"]["path"] = str(model)
        config["data"]["eval"]["n"] = 4
        config["eval"]["max_new_tokens"] = 8

    workdir = make_workdir(tmp_path / "work", edit=edit)
    snakemake(workdir, "--cores", "1", "results/eval/base/id.summary.json", "results/svd/base/embed.safetensors",
              timeout=300)
    assert not list(tmp_path.rglob("PWNED")), "a command substitution in model.path ran"
    assert yaml.safe_load((workdir / "results" / "eval" / "base" / "id.summary.json").read_text())["n"] == 4
    assert (workdir / "results" / "svd" / "base" / "embed.safetensors").stat().st_size > 0


def test_hostile_shipped_base_path_is_one_word_and_runs_nothing(tmp_path, micro_base, micro_base_settings):
    from sftrl.base import shipped

    loss = tmp_path / "loss.csv"
    loss.write_text("step,lr,loss\n1,0.003,6.9\n")
    shipped.ship(micro_base, loss, tmp_path / HOSTILE, micro_base_settings)
    workdir = make_workdir(tmp_path / "work", edit=setter("base", {**micro_base_settings,
                                                                    "shipped": str(tmp_path / HOSTILE)}))
    snakemake(workdir, "--cores", "1", "results/models/base", timeout=120)
    assert not list(tmp_path.rglob("PWNED")), "a command substitution in base.shipped ran"
    assert ((workdir / "results" / "models" / "base" / "model.safetensors").read_bytes()
            == (micro_base / "model.safetensors").read_bytes())


def test_hostile_deepspeed_path_reaches_the_launcher_as_one_argument(tmp_path):
    """accelerate cannot run here; the dry run's printed command, split as the shell would, must hold the path whole."""
    import json
    import shlex

    deepspeed = tmp_path / f"{HOSTILE}.json"
    deepspeed.write_text("{}")

    def edit(config):
        config["rl"].update(start_from=["sft-4"], algorithms=["ppo"], recovery_window=[])
        config["rl"]["ppo"].update(launcher="accelerate", num_processes=2, deepspeed=str(deepspeed))

    workdir = make_workdir(tmp_path / "work", edit=edit)
    result = snakemake(workdir, "-n", "-p", "results/seed-0/rl/ppo-from-sft-4/log.csv", timeout=120)
    command = next(line for line in result.stdout.splitlines() if "rl ppo --model" in line)
    words = shlex.split(command.removeprefix("Shell command: "))
    assert words[:5] == ["OMP_NUM_THREADS=1", "accelerate", "launch", "--num_processes", "2"]
    assert words[words.index("--deepspeed_config_file") + 1] == str(deepspeed)
    assert json.loads(words[words.index("--settings") + 1])["ppo"]["deepspeed"] == str(deepspeed)
