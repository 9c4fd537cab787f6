# Restoration sweeps (sftrl.restore; paper §4.3, Figures 5-7): every point of config restore.rank / layer / reverse
# is one restored model, `restored-<sweep>-<point>` (sftrl.checkpoint), written from the reference's and the target's
# SVD caches (rule svd: no SVD per point) and evaluated ID / OOD by the one eval_checkpoint rule. Restored models are
# temp() unless restore.keep_models: deleted once both evaluations are done (the cached factors are what is kept).
# A point's params are its own spec, so editing one sweep's values reruns only that sweep's jobs and its figure.

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
        ckpt = resolve(config["restore"][wildcards.sweep][role], f"restore.{wildcards.sweep}.{role}")
        inputs[role] = model_dir(ckpt)
        inputs[f"{role}_svd"] = svd_files(ckpt)
    return inputs


def restored_model(path):
    return directory(path) if config["restore"]["keep_models"] else temp(directory(path))


def restore_table_inputs(wildcards):
    """Eval summaries of the sweep's points, of its reference and of its target (deduplicated: B = T happens)."""
    sweep = wildcards.sweep
    ckpts = [Checkpoint("restored", 0, f"{sweep}-{point}") for point in restore_points(sweep)]
    ckpts += [resolve(config["restore"][sweep][role], f"restore.{sweep}.{role}") for role in ("reference", "target")]
    summaries = list(dict.fromkeys(f"{results_dir('eval', ckpt)}/{split}.summary.json"
                                   for ckpt in ckpts for split in SPLITS))
    measures = list(dict.fromkeys(f"{results_dir('eval', ckpt)}/rule_reading.json" for ckpt in ckpts))
    inputs = {"summaries": summaries, "measures": measures, "code": code("restore-table")}
    if any(needs_selection(config["restore"][sweep][role]) for role in ("reference", "target")):
        inputs["selection"] = selection_file()
    return inputs


def restore_targets():
    sweeps = restore_sweeps()
    return ([f"{RESULTS}/figs/{RESTORE_FIGURES[sweep]}.pdf" for sweep in sweeps]
            + [f"{RESULTS}/tables/restore_{sweep}.csv" for sweep in sweeps] + [f"{RESULTS}/tables/claims.csv"])


rule restore:
    input:
        unpack(restore_inputs),
    output:
        restored_model(f"{RESULTS}/restore/{{sweep}}-{{point}}"),
    params:
        spec=lambda wc: spec_json(restore_points(wc.sweep)[wc.point]),
        # the configured names: editing restore.<sweep>.reference / target reruns that sweep
        pair=lambda wc: json.dumps([config["restore"][wc.sweep][role] for role in ("reference", "target")]),
    log:
        "logs/restore/{sweep}-{point}.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/restore/{sweep}-{point}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    wildcard_constraints:
        sweep="|".join(SWEEPS),
    shell:
        "OMP_NUM_THREADS={threads} sftrl restore --settings {params.spec:q} --reference {input.reference:q}"
        " --target {input.target:q} --reference-svd {input.reference_svd:q} --target-svd {input.target_svd:q}"
        " --out {output:q} > {log:q} 2>&1"


rule restore_table:
    input:
        unpack(restore_table_inputs),
    output:
        report(f"{RESULTS}/tables/restore_{{sweep}}.csv", caption="../report/table_restore.rst",
               category="6. Restoration", subcategory="Tables"),
    params:
        settings=lambda wc: settings("restore", wc.sweep),
        run=config["run"],
    log:
        "logs/restore/table_{sweep}.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/restore/table_{sweep}.tsv"
    wildcard_constraints:
        sweep="|".join(SWEEPS),
    shell:
        # `{input}` as a whole: its named parts are unknown until select_sft has run (a dry run formats this
        # command before that); the command picks the summaries and the selection out of it
        "sftrl restore-table --sweep {wildcards.sweep:q} --settings {params.settings:q} --inputs {input:q}"
        " --run {params.run:q} --out {output:q} > {log:q} 2>&1"


rule fig5:
    input:
        table=f"{RESULTS}/tables/restore_layer.csv",
        code=code("figure fig5"),
    output:
        pdf=f"{RESULTS}/figs/fig5.pdf",
        png=report(f"{RESULTS}/figs/fig5.png", caption="../report/fig5.rst",
                   category="6. Restoration", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/fig5.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig5.tsv"
    shell:
        "sftrl figure fig5 --table {input.table:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig6:
    input:
        table=f"{RESULTS}/tables/restore_rank.csv",
        code=code("figure fig6"),
    output:
        pdf=f"{RESULTS}/figs/fig6.pdf",
        png=report(f"{RESULTS}/figs/fig6.png", caption="../report/fig6.rst",
                   category="6. Restoration", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/fig6.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig6.tsv"
    shell:
        "sftrl figure fig6 --table {input.table:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig7:
    input:
        table=f"{RESULTS}/tables/restore_reverse.csv",
        code=code("figure fig7"),
    output:
        pdf=f"{RESULTS}/figs/fig7.pdf",
        png=report(f"{RESULTS}/figs/fig7.png", caption="../report/fig7.rst",
                   category="6. Restoration", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/fig7.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig7.tsv"
    shell:
        "sftrl figure fig7 --table {input.table:q} --out {params.stem:q} > {log:q} 2>&1"
