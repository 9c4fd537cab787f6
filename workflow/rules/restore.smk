# Restoration sweeps (sftrl.restore; paper §4.3, Figures 5-7): every point of config restore.rank / layer / reverse
# is one restored model, `restored-<sweep>-<point>` (sftrl.checkpoint), written from the reference's and the target's
# SVD caches (rule svd: no SVD per point) and evaluated ID / OOD by the one eval_checkpoint rule. Restored models are
# temp() unless restore.keep_models: deleted once both evaluations are done (the cached factors are what is kept).
# A point's params are its own spec, so editing one sweep's values reruns only that sweep's jobs and its figure.
from sftrl.checkpoint import needs_selection  # noqa: E402
from sftrl.restore.spec import SWEEPS, spec_json, sweep_points  # noqa: E402

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
        _name = config["restore"][_sweep][_role]
        if not needs_selection(_name):
            try:
                Checkpoint.parse(_name)
            except ValueError as e:
                raise WorkflowError(f"config restore.{_sweep}.{_role}: {e}")


def restore_sweeps():
    """The sweeps the default target builds: reverse needs RL checkpoints, so only with the rl rule (issue 13)."""
    return [sweep for sweep in SWEEPS if sweep != "reverse" or workflow.is_rule("rl")]


def restore_resolve(sweep, role):
    """restore.<sweep>.<role> as a concrete checkpoint (selections through the select_sft checkpoint)."""
    name = config["restore"][sweep][role]
    selection = None
    if needs_selection(name):
        with checkpoints.select_sft.get().output[0].open() as f:
            selection = json.load(f)
    try:
        ckpt = Checkpoint.resolve(name, selection)
    except ValueError as e:
        raise WorkflowError(f"config restore.{sweep}.{role}: {e}")
    if ckpt.stage == "sft" and ckpt.step not in sft_steps():
        raise WorkflowError(f"config restore.{sweep}.{role}: {name} is not a saved SFT step {sft_steps()}")
    if ckpt.stage == "rl" and not workflow.is_rule("rl") and not os.path.isdir(model_dir(ckpt)):
        raise WorkflowError(f"config restore.{sweep}.{role} = {name!r}: an RL checkpoint ({model_dir(ckpt)}), but this "
                            "workflow has no rl rule to make it (issue 13) and it does not exist")
    return ckpt


def restore_inputs(wildcards):
    inputs = {"code": code("restore")}
    for role in ("reference", "target"):
        ckpt = restore_resolve(wildcards.sweep, role)
        inputs[role] = model_dir(ckpt)
        inputs[f"{role}_svd"] = svd_files(ckpt)
    return inputs


def restored_model(path):
    return directory(path) if config["restore"]["keep_models"] else temp(directory(path))


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
        "OMP_NUM_THREADS={threads} sftrl restore --settings {params.spec:q} --reference {input.reference}"
        " --target {input.target} --reference-svd {input.reference_svd} --target-svd {input.target_svd}"
        " --out {output} > {log} 2>&1"


def restore_table_inputs(wildcards):
    """Eval summaries of the sweep's points, of its reference and of its target (deduplicated: B = T happens)."""
    sweep = wildcards.sweep
    ckpts = [Checkpoint("restored", 0, f"{sweep}-{point}") for point in restore_points(sweep)]
    ckpts += [restore_resolve(sweep, role) for role in ("reference", "target")]
    summaries = list(dict.fromkeys(f"{results_dir('eval', ckpt)}/{split}.summary.json"
                                   for ckpt in ckpts for split in SPLITS))
    inputs = {"summaries": summaries, "code": code("restore-table")}
    if any(needs_selection(config["restore"][sweep][role]) for role in ("reference", "target")):
        inputs["selection"] = checkpoints.select_sft.get().output[0]
    return inputs


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
        "sftrl restore-table --sweep {wildcards.sweep} --settings {params.settings:q} --inputs {input}"
        " --run {params.run} --out {output} > {log} 2>&1"


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
        "sftrl figure fig5 --table {input.table} --out {params.stem} > {log} 2>&1"


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
        "sftrl figure fig6 --table {input.table} --out {params.stem} > {log} 2>&1"


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
        "sftrl figure fig7 --table {input.table} --out {params.stem} > {log} 2>&1"


rule claims:
    input:
        eval_table=f"{RESULTS}/tables/eval.csv",
        selection=f"{RESULTS}/sft/selection.json",
        tables=[f"{RESULTS}/tables/spectral_{table}.csv" for table in ("sigma", "angles")]
        + [f"{RESULTS}/tables/restore_{sweep}.csv" for sweep in restore_sweeps()],
        code=code("claims"),
    output:
        table=report(f"{RESULTS}/tables/claims.csv", caption="../report/table_claims.rst",
                     category="6. Restoration", subcategory="Tables"),
        markdown=f"{RESULTS}/tables/claims.md",
    log:
        "logs/report/claims.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/report/claims.tsv"
    shell:
        "sftrl claims --eval-table {input.eval_table} --selection {input.selection} --tables {input.tables}"
        " --out {output.table} --markdown {output.markdown} > {log} 2>&1"


def restore_targets():
    sweeps = restore_sweeps()
    return ([f"{RESULTS}/figs/{RESTORE_FIGURES[sweep]}.pdf" for sweep in sweeps]
            + [f"{RESULTS}/tables/restore_{sweep}.csv" for sweep in sweeps] + [f"{RESULTS}/tables/claims.csv"])
