# The restore stage's plan, for restore.smk's rules: the sweeps' points (checked at parse time), B and T resolved, the
# inputs, the targets. (Snakemake's lint wants functions apart from rules: each stage's plan is its own file, included
# just before its rules.)

from sftrl.restore.spec import SWEEPS, spec_json, sweep_points

RESTORE_FIGURES = {"layer": "fig5", "rank": "fig6", "reverse": "fig7"}


def restore_points(sweep):
    """Point name -> RestoreSpec of one configured sweep (parse time: a bad value fails before any job runs)."""
    try:
        return sweep_points(sweep, config["restore"][sweep])
    except ValueError as e:
        raise WorkflowError(f"config {e}" if str(e).startswith("restore.") else f"config restore.{sweep}: {e}")


for _sweep in SWEEPS:
    restore_points(_sweep)
    for _role in ("reference", "target"):
        if not needs_selection(config["restore"][_sweep][_role]):
            check_name(config["restore"][_sweep][_role], f"restore.{_sweep}.{_role}")


def restore_sweeps():
    """The sweeps the default target builds: reverse needs its RL checkpoint, so only with the RL rules (issue 13)."""
    return [sweep for sweep in SWEEPS if sweep != "reverse" or has_rl_rule(config["restore"]["reverse"]["target"])]


def restore_inputs(wildcards):
    inputs = {"code": code("restore")}
    for role in ("reference", "target"):
        ckpt = resolve(config["restore"][wildcards.sweep][role], f"restore.{wildcards.sweep}.{role}", wildcards.seed)
        inputs[role] = model_dir(ckpt, wildcards.seed)
        inputs[f"{role}_svd"] = svd_files(ckpt, wildcards.seed)
    return inputs


def restored_model(path):
    return directory(path) if config["restore"]["keep_models"] else temp(directory(path))


def restore_table_inputs(wildcards):
    """Eval summaries of the sweep's points, of its reference and of its target (deduplicated: B = T happens)."""
    sweep, seed = wildcards.sweep, wildcards.seed
    ckpts = [Checkpoint("restored", 0, f"{sweep}-{point}") for point in restore_points(sweep)]
    ckpts += [resolve(config["restore"][sweep][role], f"restore.{sweep}.{role}", seed)
              for role in ("reference", "target")]
    summaries = list(dict.fromkeys(f"{results_dir('eval', ckpt, seed)}/{split}.summary.json"
                                   for ckpt in ckpts for split in SPLITS))
    measures = list(dict.fromkeys(f"{results_dir('eval', ckpt, seed)}/rule_reading.json" for ckpt in ckpts))
    inputs = {"summaries": summaries, "measures": measures, "code": code("restore-table")}
    if any(needs_selection(config["restore"][sweep][role]) for role in ("reference", "target")):
        inputs["selection"] = selection_file(seed)
    return inputs


def restore_targets():
    sweeps = restore_sweeps()
    return ([f"{RESULTS}/figs/{RESTORE_FIGURES[sweep]}.pdf" for sweep in sweeps]
            + [table for sweep in sweeps for table in each_seed(f"tables/restore_{sweep}.csv")]
            + [f"{RESULTS}/tables/claims.csv"])
