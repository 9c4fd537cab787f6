# RL from chosen SFT checkpoints (sftrl.train: rl, ppo, grpo): one job per run `<algo>-from-<start>`, writing a
# checkpoint every rl.save_every updates; each checkpoint is evaluated by eval_checkpoint into results/tables/eval.csv.
# Runs: every algorithm in rl.algorithms from every rl.start_from checkpoint, and PPO from every rl.recovery_window
# step; inter_sft / end_sft resolve through the select_sft checkpoint, and a run named twice runs once.
import importlib.util

from sftrl.checkpoint import ALGORITHMS
from sftrl.train.rl import TRAINERS, save_updates

# the keys of config rl that are not one run's knobs (which runs exist), and the arms' own subsections
RL_PLAN_KEYS = ("start_from", "algorithms", "recovery_window", *ALGORITHMS)


def _check_rl_config():
    rl = config["rl"]
    for algo in rl["algorithms"] + (["ppo"] if rl["recovery_window"] else []):
        trainer_module = TRAINERS[algo].split(":")[0]
        if importlib.util.find_spec(trainer_module) is None:
            raise WorkflowError(f"config rl.algorithms names {algo}, but {trainer_module} is not in this checkout")
        if algo not in rl:
            raise WorkflowError(f"config rl.algorithms names {algo}, but config rl has no {algo} subsection")
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
    section = {k: v for k, v in config["rl"].items() if k not in RL_PLAN_KEYS or k == algo}
    return json.dumps(section, sort_keys=True)


def rl_updates(algo):
    """Updates at which a run of `algo` saves (and which are evaluated)."""
    return save_updates(config["rl"][algo]["updates"], config["rl"]["save_every"])


def rl_runs(ppo_only_window=False):
    """(algo, concrete start Checkpoint) of every configured run, in config order, without repeats. Resolving
    inter_sft / end_sft waits for the select_sft checkpoint. ppo_only_window: only the PPO runs (the window's and
    those from rl.start_from), as the recovery-window figure needs."""
    rl = config["rl"]
    named = [(algo, name) for name in rl["start_from"] for algo in rl["algorithms"]]
    named += [("ppo", f"sft-{step}") for step in rl["recovery_window"]]
    if ppo_only_window:
        named = [(algo, name) for algo, name in named if algo == "ppo"]
    selection = None
    if any(name in SELECTIONS for _, name in named):
        with checkpoints.select_sft.get().output[0].open() as f:
            selection = json.load(f)
    runs = []
    for algo, name in named:
        run = (algo, Checkpoint.resolve(name, selection))
        if run not in runs:
            runs.append(run)
    return runs


def rl_checkpoints(runs=None):
    """Every evaluated RL checkpoint: each saved update of each run."""
    return [Checkpoint.rl(algo, start, u) for algo, start in (runs or rl_runs()) for u in rl_updates(algo)]


def rl_launcher(algo):
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config rl.<algo>)."""
    arm = config["rl"][algo]
    if arm.get("launcher", "local") != "accelerate":
        return "sftrl"
    deepspeed = f" --use_deepspeed --deepspeed_config_file {arm['deepspeed']}" if arm.get("deepspeed") else ""
    return f"accelerate launch --num_processes {arm['num_processes']}{deepspeed} -m sftrl.cli"


# One rule per arm, written out (outputs differ by the arm's update count); rl_grpo is rl_ppo with "grpo" for
# "ppo" (and COMMANDS "rl grpo" -> sftrl.train.grpo:command). Each runs `sftrl rl <algo>`, whose code is its arm only.
rule rl_ppo:
    input:
        model=lambda wc: model_dir(Checkpoint.parse(wc.start)),
        code=code("rl ppo"),
    output:
        checkpoints=[directory(f"{RESULTS}/rl/ppo-from-{{start}}/checkpoint-{u}") for u in rl_updates("ppo")],
        log=f"{RESULTS}/rl/ppo-from-{{start}}/log.csv",
    params:
        settings=rl_settings("ppo"),
        model_settings=settings("model"),
        env_settings=settings("env"),
        data_settings=settings("data", "sft"),
        launcher=rl_launcher("ppo"),
        out_dir=lambda wc, output: os.path.dirname(output.log),
        # resumable state (weights, value head, optimizer, log rows): outside the outputs, which Snakemake deletes
        work_dir=lambda wc: f"{RESULTS}/work/rl/ppo-from-{wc.start}",
    wildcard_constraints:
        start=r"base|sft-\d+",
    log:
        "logs/rl/ppo-from-{start}.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/rl/ppo-from-{start}.tsv"
    # one thread on CPU: two runs side by side use 2 cores better than one run with two threads (cpu_notes.md)
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} rl ppo --model {input.model} --start {wildcards.start}"
        " --settings {params.settings:q} --model-settings {params.model_settings:q}"
        " --env-settings {params.env_settings:q} --data-settings {params.data_settings:q}"
        " --out-dir {params.out_dir} --work-dir {params.work_dir} --log {output.log} --threads {threads} > {log} 2>&1"


def rl_log_inputs(wildcards):
    return [f"{RESULTS}/rl/{algo}-from-{start.name}/log.csv" for algo, start in rl_runs()]


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
        "sftrl rl-log {input.logs} --out {output} > {log} 2>&1"


def recovery_window_summaries(wildcards):
    """Only what the figure draws: the summaries of Inter_SFT, End_SFT, every PPO run's start and checkpoints."""
    with checkpoints.select_sft.get().output[0].open() as f:
        selection = json.load(f)
    runs = rl_runs(ppo_only_window=True)
    ckpts = [Checkpoint.resolve(key, selection) for key in SELECTIONS] + [start for _, start in runs]
    ckpts += rl_checkpoints(runs)
    names = list(dict.fromkeys(c.name for c in ckpts))
    return [f"{RESULTS}/eval/{name}/{split}.summary.json" for name in names for split in SPLITS]


rule fig_recovery_window:
    input:
        summaries=recovery_window_summaries,
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
        "sftrl figure recovery_window --summaries {input.summaries} --selection {input.selection}"
        " --out {params.stem} > {log} 2>&1"


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
    log:
        "logs/figs/fig1b.log",
    benchmark:
        "benchmarks/figs/fig1b.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig1b --eval-table {input.table} --selection {input.selection} --out {params.stem} > {log} 2>&1"


def rl_targets():
    rl = config["rl"]
    if not (rl["algorithms"] and rl["start_from"]) and not rl["recovery_window"]:
        return []
    targets = [f"{RESULTS}/tables/rl_log.csv", f"{RESULTS}/figs/fig1b.pdf"]
    if rl["recovery_window"] or ("ppo" in rl["algorithms"] and rl["start_from"]):
        targets.append(f"{RESULTS}/figs/recovery_window.pdf")
    return targets
