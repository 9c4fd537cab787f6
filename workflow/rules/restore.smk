# Restoration sweeps (sftrl.restore; paper §4.3, Figures 5-7): every point of config restore.rank / layer / reverse
# is one restored model per replicate seed, `restored-<sweep>-<point>` (sftrl.checkpoint), written from the
# reference's and the target's SVD caches (rule svd: no SVD per point) and evaluated ID / OOD by the one
# eval_checkpoint rule. Restored models are temp() unless restore.keep_models: deleted once both evaluations are done
# (the cached factors are what is kept). A point's params are its own spec, so editing one sweep's values reruns only
# that sweep's jobs and its figure.


rule restore:
    input:
        unpack(restore_inputs),
    output:
        restored_model(seeded("restore/{sweep}-{point}")),
    params:
        spec=lambda wc: spec_json(restore_points(wc.sweep)[wc.point]),
        # the configured names: editing restore.<sweep>.reference / target reruns that sweep
        pair=lambda wc: json.dumps([config["restore"][wc.sweep][role] for role in ("reference", "target")]),
    log:
        "logs/seed-{seed}/restore/{sweep}-{point}.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/restore/{sweep}-{point}.tsv"
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
        report(seeded("tables/restore_{sweep}.csv"), caption="../report/table_restore.rst",
               category="6. Restoration", subcategory="Tables"),
    params:
        settings=lambda wc: settings("restore", wc.sweep),
        run=config["run"],
    log:
        "logs/seed-{seed}/restore/table_{sweep}.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/restore/table_{sweep}.tsv"
    wildcard_constraints:
        sweep="|".join(SWEEPS),
    shell:
        # `{input}` as a whole: its named parts are unknown until select_sft has run (a dry run formats this
        # command before that); the command picks the summaries and the selection out of it
        "sftrl restore-table --sweep {wildcards.sweep:q} --settings {params.settings:q} --inputs {input:q}"
        " --run {params.run:q} --out {output:q} > {log:q} 2>&1"


rule fig5:
    input:
        tables=each_seed("tables/restore_layer.csv"),
        code=code("figure fig5"),
    output:
        pdf=f"{RESULTS}/figs/fig5.pdf",
        png=report(f"{RESULTS}/figs/fig5.png", caption="../report/fig5.rst",
                   category="6. Restoration", subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
    log:
        "logs/figs/fig5.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig5.tsv"
    shell:
        "sftrl figure fig5 --seeds {params.seeds:q} --table {input.tables:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig6:
    input:
        tables=each_seed("tables/restore_rank.csv"),
        code=code("figure fig6"),
    output:
        pdf=f"{RESULTS}/figs/fig6.pdf",
        png=report(f"{RESULTS}/figs/fig6.png", caption="../report/fig6.rst",
                   category="6. Restoration", subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
    log:
        "logs/figs/fig6.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig6.tsv"
    shell:
        "sftrl figure fig6 --seeds {params.seeds:q} --table {input.tables:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig7:
    input:
        tables=each_seed("tables/restore_reverse.csv"),
        code=code("figure fig7"),
    output:
        pdf=f"{RESULTS}/figs/fig7.pdf",
        png=report(f"{RESULTS}/figs/fig7.png", caption="../report/fig7.rst",
                   category="6. Restoration", subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
    log:
        "logs/figs/fig7.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig7.tsv"
    shell:
        "sftrl figure fig7 --seeds {params.seeds:q} --table {input.tables:q} --out {params.stem:q} > {log:q} 2>&1"
