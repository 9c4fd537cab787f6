# The rl stage's plan, for rl.smk's rules: the checks of config rl, the runs, their knobs, launchers and checkpoints,
# the RL targets. (Snakemake's lint wants functions apart from rules: each stage's plan is its own file, included just
# before its rules.)

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
    """Input function: a run's knobs as one JSON string, with the replicate's seed (replicate_seed): config rl
    without the run plan and the other arms' subsections, so adding a start or a recovery step does not rerun the
    existing runs."""
    return lambda wildcards: json.dumps(run_settings(replicate_seed(config["rl"], wildcards.seed), algo,
                                                     config["eval"]["stop_tokens"]), sort_keys=True)


def rl_runs(seed):
    """(algo, concrete start Checkpoint) of every configured run of replicate `seed`, in config order, without
    repeats (common.smk rl_named_runs; inter_sft / end_sft resolve once the replicate's select_sft has run)."""
    runs = []
    for algo, name in rl_named_runs():
        key = "rl.start_from" if name in config["rl"]["start_from"] else "rl.recovery_window"
        run = (algo, resolve(name, key, seed))
        if run not in runs:
            runs.append(run)
    return runs


def rl_checkpoints(seed):
    """Every evaluated RL checkpoint of replicate `seed`: each saved update of each run."""
    return [Checkpoint.rl(algo, start, u) for algo, start in rl_runs(seed) for u in rl_updates(algo)]


def rl_launcher(algo):
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config rl.<algo>).
    An argument list, rendered with `:q` in the shell command: a DeepSpeed JSON path is one word, never shell code."""
    arm = config["rl"][algo]
    if arm.get("launcher", "local") != "accelerate":
        return ["sftrl"]
    deepspeed = ["--use_deepspeed", "--deepspeed_config_file", arm["deepspeed"]] if arm.get("deepspeed") else []
    return ["accelerate", "launch", "--num_processes", str(arm["num_processes"]), *deepspeed, "-m", "sftrl.cli"]


def rl_log_inputs(wildcards):
    return [seeded(f"rl/{algo}-from-{start.name}/log.csv") for algo, start in rl_runs(wildcards.seed)]


def rl_targets():
    rl = config["rl"]
    if not (rl["algorithms"] and rl["start_from"]) and not rl["recovery_window"]:
        return []
    targets = each_seed("tables/rl_log.csv") + [f"{RESULTS}/figs/fig1b.pdf"]
    if rl["recovery_window"] or ("ppo" in rl["algorithms"] and rl["start_from"]):
        targets.append(f"{RESULTS}/figs/recovery_window.pdf")
    return targets
