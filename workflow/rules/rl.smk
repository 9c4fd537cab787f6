# RL from chosen SFT checkpoints (sftrl.train: rl, ppo, grpo): one job per run `<algo>-from-<start>`, writing a
# checkpoint every rl.save_every updates; each checkpoint is evaluated by eval_checkpoint into results/tables/eval.csv.
# Runs: every algorithm in rl.algorithms from every rl.start_from checkpoint, and PPO from every rl.recovery_window
# step; inter_sft / end_sft resolve through the select_sft checkpoint, and a run named twice runs once.


import importlib.util

from sftrl.restore.spec import SWEEPS
from sftrl.train.rl import TRAINERS, run_settings  # numpy, no torch: parse-time safe


def _check_rl_config():
    from sftrl.config_checks import check_planned_rl_checkpoint
    from sftrl.train.grpo import check_settings as grpo_settings
    from sftrl.train.ppo import check_settings as ppo_settings

    rl = config["rl"]
    for algo in rl["algorithms"] + (["ppo"] if rl["recovery_window"] else []):
        trainer_module = TRAINERS[algo].split(":")[0]
        if importlib.util.find_spec(trainer_module) is None:
            raise WorkflowError(f"config rl.algorithms names {algo}, but {trainer_module} is not in this checkout")
        if algo not in rl:
            raise WorkflowError(f"config rl.algorithms names {algo}, but config rl has no {algo} subsection")
        deepspeed = rl[algo].get("deepspeed")
        if deepspeed and not os.path.isfile(deepspeed):
            raise WorkflowError(f"config rl.{algo}.deepspeed = {deepspeed!r}: no such DeepSpeed JSON file")
    try:
        # the trainers' own checks (batch sizes that divide, ...), before any job rather than when the run starts
        if "ppo" in rl["algorithms"] or rl["recovery_window"]:
            ppo_settings(rl["ppo"], rl)
        if "grpo" in rl["algorithms"]:
            grpo_settings(rl["grpo"])
        updates = {algo: save_updates(rl[algo]["updates"], rl["save_every"]) for algo in ALGORITHMS}
        for sweep in SWEEPS:
            for role in ("reference", "target"):
                check_planned_rl_checkpoint(config["restore"][sweep][role], f"restore.{sweep}.{role}", updates,
                                            sft_steps())
    except ValueError as e:
        raise WorkflowError(str(e) if str(e).startswith("config ") else f"config {e}")
    for name in rl["start_from"]:
        if name not in SELECTIONS and Checkpoint.parse(name).step not in sft_steps():
            raise WorkflowError(f"config rl.start_from: {name} is not a saved SFT step {sft_steps()}")
    for step in rl["recovery_window"]:
        if step not in sft_steps():
            raise WorkflowError(f"config rl.recovery_window: {step} is not a saved SFT step {sft_steps()}")


_check_rl_config()


def rl_settings(algo):
    """A run's knobs as one JSON string: config rl without the run plan and the other arms' subsections, so adding a
    start or a recovery step does not rerun the existing runs."""
    return json.dumps(run_settings(config["rl"], algo, config["eval"]["stop_tokens"]), sort_keys=True)


def rl_runs(ppo_only_window=False):
    """(algo, concrete start Checkpoint) of every configured run, in config order, without repeats (common.smk
    rl_named_runs; inter_sft / end_sft resolve once select_sft has run). ppo_only_window: only the PPO runs (the
    window's and those from rl.start_from), as the recovery-window figure needs."""
    runs = []
    for algo, name in rl_named_runs():
        if ppo_only_window and algo != "ppo":
            continue
        run = (algo, resolve(name, "rl.start_from" if name in config["rl"]["start_from"] else "rl.recovery_window"))
        if run not in runs:
            runs.append(run)
    return runs


def rl_checkpoints(runs=None):
    """Every evaluated RL checkpoint: each saved update of each run."""
    return [Checkpoint.rl(algo, start, u) for algo, start in (rl_runs() if runs is None else runs)
            for u in rl_updates(algo)]


def rl_launcher(algo):
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config rl.<algo>).
    An argument list, rendered with `:q` in the shell command: a DeepSpeed JSON path is one word, never shell code."""
    arm = config["rl"][algo]
    if arm.get("launcher", "local") != "accelerate":
        return ["sftrl"]
    deepspeed = ["--use_deepspeed", "--deepspeed_config_file", arm["deepspeed"]] if arm.get("deepspeed") else []
    return ["accelerate", "launch", "--num_processes", str(arm["num_processes"]), *deepspeed, "-m", "sftrl.cli"]


def rl_log_inputs(wildcards):
    return [f"{RESULTS}/rl/{algo}-from-{start.name}/log.csv" for algo, start in rl_runs()]


def recovery_window_summaries(wildcards):
    """Only what the figure draws: the summaries of Inter_SFT, End_SFT, every PPO run's start and checkpoints."""
    runs = rl_runs(ppo_only_window=True)
    ckpts = [resolve(name, "rl.recovery_window") for name in SELECTIONS] + [start for _, start in runs]
    ckpts += rl_checkpoints(runs)
    names = list(dict.fromkeys(c.name for c in ckpts))
    return [f"{RESULTS}/eval/{name}/{split}.summary.json" for name in names for split in SPLITS]


def recovery_window_measures(wildcards):
    """The rule-reading reports of the checkpoints whose summaries the recovery-window figure reads."""
    names = dict.fromkeys(os.path.basename(os.path.dirname(p)) for p in recovery_window_summaries(wildcards))
    return [f"{RESULTS}/eval/{name}/rule_reading.json" for name in names]


def rl_targets():
    rl = config["rl"]
    if not (rl["algorithms"] and rl["start_from"]) and not rl["recovery_window"]:
        return []
    targets = [f"{RESULTS}/tables/rl_log.csv", f"{RESULTS}/figs/fig1b.pdf"]
    if rl["recovery_window"] or ("ppo" in rl["algorithms"] and rl["start_from"]):
        targets.append(f"{RESULTS}/figs/recovery_window.pdf")
    return targets


# One rule per arm (rl_ppo, rl_grpo), made by one function: their outputs differ by the arm's update count. Each runs
# `sftrl rl <algo>`, whose code is its arm only. A function, not a loop body: a rule's shell command is formatted
# again when its job runs, and a loop variable would then hold the last arm for every rule (a closure keeps each).
def _rl_rule(algo):

    rule:
        name:
            f"rl_{algo}"
        input:
            model=lambda wc: model_dir(Checkpoint.parse(wc.start)),
            code=code(f"rl {algo}"),
        output:
            checkpoints=[directory(f"{RESULTS}/rl/{algo}-from-{{start}}/checkpoint-{u}")
                         for u in rl_updates(algo)],
            log=f"{RESULTS}/rl/{algo}-from-{{start}}/log.csv",
        params:
            settings=rl_settings(algo),
            model_settings=settings("model"),
            env_settings=settings("env"),
            data_settings=settings("data", "sft"),
            launcher=rl_launcher(algo),
            out_dir=lambda wc, output: os.path.dirname(output.log),
            # resumable state (weights, optimizer, the arm's own such as PPO's value head, log rows): outside the
            # outputs, which Snakemake deletes before a job starts ({start}: the job's wildcard)
            work_dir=f"{RESULTS}/work/rl/{algo}-from-{{start}}",
        wildcard_constraints:
            start=r"base|sft-\d+",
        log:
            f"logs/rl/{algo}-from-{{start}}.log",
        conda:
            "../envs/train.yaml"
        benchmark:
            f"benchmarks/rl/{algo}-from-{{start}}.tsv"
        # one thread on CPU: two runs side by side use 2 cores better than one run with two threads (cpu_notes.md)
        threads: 1
        resources:
            mem_mb=8000,
            runtime=240,
        shell:
            # one f-string part, the arm (`rl ppo`); the plain parts are formatted by Snakemake, per job
            "OMP_NUM_THREADS={threads} {params.launcher:q} "
            f"rl {algo}"
            " --model {input.model:q} --start {wildcards.start:q}"
            " --settings {params.settings:q} --model-settings {params.model_settings:q}"
            " --env-settings {params.env_settings:q} --data-settings {params.data_settings:q}"
            " --out-dir {params.out_dir:q} --work-dir {params.work_dir:q} --log {output.log:q} --threads {threads}"
            " > {log:q} 2>&1"


for _algo in ALGORITHMS:
    _rl_rule(_algo)


rule rl_log:
    input:
        logs=rl_log_inputs,
        code=code("rl-log"),
    output:
        report(f"{RESULTS}/tables/rl_log.csv", caption="../report/table_rl_log.rst", category="3b. RL",
               subcategory="Tables"),
    log:
        "logs/rl/rl_log.log",
    benchmark:
        "benchmarks/rl/rl_log.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl rl-log {input.logs:q} --out {output:q} > {log:q} 2>&1"


rule fig_recovery_window:
    input:
        summaries=recovery_window_summaries,
        measures=recovery_window_measures,
        selection=f"{RESULTS}/sft/selection.json",
        code=code("figure recovery_window"),
    output:
        pdf=f"{RESULTS}/figs/recovery_window.pdf",
        png=report(f"{RESULTS}/figs/recovery_window.png", caption="../report/recovery_window.rst", category="3b. RL",
                   subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/recovery_window.log",
    benchmark:
        "benchmarks/figs/recovery_window.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure recovery_window --summaries {input.summaries:q} --measures {input.measures:q}"
        " --selection {input.selection:q}"
        " --out {params.stem:q} > {log:q} 2>&1"


rule fig1b:
    input:
        table=f"{RESULTS}/tables/eval.csv",
        selection=f"{RESULTS}/sft/selection.json",
        code=code("figure fig1b"),
    output:
        pdf=f"{RESULTS}/figs/fig1b.pdf",
        png=report(f"{RESULTS}/figs/fig1b.png", caption="../report/fig1b.rst", category="3b. RL",
                   subcategory="Figures"),
    params:
        stem=stem,
        expect_rows=expected_eval_rows(),
    log:
        "logs/figs/fig1b.log",
    benchmark:
        "benchmarks/figs/fig1b.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig1b --eval-table {input.table:q} --selection {input.selection:q} --out {params.stem:q}"
        " --expect-rows {params.expect_rows:q} > {log:q} 2>&1"
