# Spectral analysis of the weights (paper §2.3-2.4, §4): every selected matrix of every checkpoint is decomposed
# ONCE into a verified SVD cache (rule svd, one job per checkpoint x shard); every analysis reads the cache, so
# rerunning an analysis never recomputes an SVD. Numerics: sftrl.weights (names, tensors, svd, subspace); tables:
# sftrl.analysis; figures: sftrl.figures (drawn only from the tidy tables under results/tables/). Figures (PNG) and
# tables are flagged for the HTML report (`make report`), with captions from workflow/report/. Plan: spectral_plan.smk.


rule svd:
    input:
        model=checkpoint_model,
        code=code("svd"),
    output:
        f"{results_dir('svd')}/{{shard}}.safetensors",
    params:
        # the shard's matrices: a different selection or sharding reruns exactly the affected shards
        names=lambda wc: json.dumps(svd_shards()[wc.shard]),
        settings=spectral_settings("dtype", "device"),
    log:
        "logs/seed-{seed}/svd/{ckpt}/{shard}.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/svd/{ckpt}/{shard}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    wildcard_constraints:
        shard="|".join(svd_shards()),
        ckpt=REPLICATE_NAME_PATTERN,
    shell:
        "OMP_NUM_THREADS={threads} sftrl svd --model {input.model:q} --names {params.names:q}"
        " --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"


# The shared base's SVDs: once for every replicate, under results/svd/base/.
use rule svd as svd_base with:
    output:
        f"{results_dir('svd', seed=None)}/{{shard}}.safetensors",
    wildcard_constraints:
        shard="|".join(svd_shards()),
        ckpt="base",
    log:
        "logs/svd/{ckpt}/{shard}.log",
    benchmark:
        "benchmarks/svd/{ckpt}/{shard}.tsv"


rule spectral_pair:
    input:
        unpack(spectral_pair_inputs),
    output:
        sigma=seeded("spectral/{ref}/{tgt}/sigma.csv"),
        angles=seeded("spectral/{ref}/{tgt}/angles.csv"),
        energy=seeded("spectral/{ref}/{tgt}/energy.csv"),
    params:
        top_r=lookup(dpath="spectral/top_r", within=config),
        run=config["run"],
        cross_attention=json.dumps(cross_attention_layers()),
        svd_plan=json.dumps(svd_shards()),  # every shard must hold exactly its planned matrices
    log:
        "logs/seed-{seed}/spectral/{ref}/{tgt}.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/spectral/{ref}/{tgt}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "OMP_NUM_THREADS={threads} sftrl spectral --ref {wildcards.ref:q} --tgt {wildcards.tgt:q}"
        " --ref-model {input.ref_model:q} --tgt-model {input.tgt_model:q}"
        " --ref-svd {input.ref_svd:q} --tgt-svd {input.tgt_svd:q} --top-r {params.top_r:q} --run {params.run:q}"
        " --cross-attention {params.cross_attention:q}"
        " --svd-plan {params.svd_plan:q}"
        " --out-sigma {output.sigma:q} --out-angles {output.angles:q} --out-energy {output.energy:q} > {log:q} 2>&1"


rule spectral_tables:
    input:
        unpack(spectral_tables_inputs),
    output:
        sigma=report(seeded("tables/spectral_sigma.csv"), caption="../report/table_spectral.rst",
                     category="4. Spectral analysis", subcategory="Tables"),
        angles=report(seeded("tables/spectral_angles.csv"), caption="../report/table_spectral.rst",
                      category="4. Spectral analysis", subcategory="Tables"),
        energy=report(seeded("tables/spectral_energy.csv"), caption="../report/table_spectral.rst",
                      category="4. Spectral analysis", subcategory="Tables"),
    params:
        pairs=json.dumps(spectral_pairs()),
    log:
        "logs/seed-{seed}/spectral/tables.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/spectral/tables.tsv"
    shell:
        # `{input}` as a whole: its named parts are unknown until select_sft has run (a dry run formats this
        # command before that); the command picks the per-pair CSVs out of it, in config order
        "sftrl spectral-collect --pairs {params.pairs:q} --inputs {input:q}"
        " --out-sigma {output.sigma:q} --out-angles {output.angles:q} --out-energy {output.energy:q} > {log:q} 2>&1"


rule embed_lmhead:
    input:
        svd=[svd_files(ckpt, shards=["embed"]) for ckpt in evaluated_checkpoints()],
        code=code("embed-lmhead"),
    output:
        report(seeded("tables/embed_lmhead.csv"), caption="../report/table_embed_lmhead.rst",
               category="4. Spectral analysis", subcategory="Tables"),
    params:
        top_r=lookup(dpath="spectral/top_r", within=config),
        run=config["run"],
        svd_plan=json.dumps(svd_shards()),
    log:
        "logs/seed-{seed}/spectral/embed_lmhead.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/spectral/embed_lmhead.tsv"
    shell:
        "sftrl embed-lmhead --svd {input.svd:q} --top-r {params.top_r:q} --run {params.run:q} --out {output:q}"
        " --svd-plan {params.svd_plan:q} > {log:q} 2>&1"


rule drift:
    input:
        svd=[svd_files(ckpt) for ckpt in evaluated_checkpoints()],
        table=seeded("tables/eval_sft.csv"),  # OOD along SFT: the base + SFT rows (no wait for RL)
        losses=seeded("tables/sft_loss.csv"),
        code=code("drift"),
    output:
        table=report(seeded("tables/drift.csv"), caption="../report/table_drift.rst",
                     category="5. Rotation drift", subcategory="Tables"),
        correlation=report(seeded("tables/drift_correlation.json"), caption="../report/table_drift.rst",
                           category="5. Rotation drift", subcategory="Tables"),
    params:
        top_k=lookup(dpath="spectral/drift_top_k", within=config),
        run=config["run"],
        cross_attention=json.dumps(cross_attention_layers()),
        svd_plan=json.dumps(svd_shards()),
        expect_rows=expected_eval_rows(rl=False),
    log:
        "logs/seed-{seed}/spectral/drift.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/seed-{seed}/spectral/drift.tsv"
    shell:
        "sftrl drift --svd {input.svd:q} --eval-table {input.table:q} --loss-table {input.losses:q}"
        " --top-k {params.top_k:q} --run {params.run:q} --cross-attention {params.cross_attention:q} --out {output.table:q} --correlation {output.correlation:q}"
        " --svd-plan {params.svd_plan:q} --expect-rows {params.expect_rows:q} > {log:q} 2>&1"


rule fig3:
    input:
        table=first_seed("tables/spectral_sigma.csv"),
        code=code("figure fig3"),
    output:
        pdf=f"{RESULTS}/figs/fig3.pdf",
        png=report(f"{RESULTS}/figs/fig3.png", caption="../report/fig3.rst",
                   category="4. Spectral analysis", subcategory="Figures"),
    params:
        stem=stem,
        layer=lookup(dpath="spectral/sigma_layer", within=config),
    log:
        "logs/figs/fig3.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig3.tsv"
    shell:
        "sftrl figure fig3 --sigma-table {input.table:q} --layer {params.layer:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig4:
    input:
        table=first_seed("tables/spectral_angles.csv"),
        code=code("figure fig4"),
    output:
        pdf=f"{RESULTS}/figs/fig4.pdf",
        png=report(f"{RESULTS}/figs/fig4.png", caption="../report/fig4.rst",
                   category="4. Spectral analysis", subcategory="Figures"),
    params:
        stem=stem,
        matrix=lookup(dpath="spectral/angle_matrix", within=config),
    log:
        "logs/figs/fig4.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig4.tsv"
    shell:
        "sftrl figure fig4 --angle-table {input.table:q} --matrix {params.matrix:q}"
        " --out {params.stem:q} > {log:q} 2>&1"


rule fig4_layers:
    input:
        table=first_seed("tables/spectral_angles.csv"),
        code=code("figure fig4_layers"),
    output:
        pdf=f"{RESULTS}/figs/fig4_layers.pdf",
        png=report(f"{RESULTS}/figs/fig4_layers.png", caption="../report/fig4_layers.rst",
                   category="4. Spectral analysis", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/fig4_layers.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/fig4_layers.tsv"
    shell:
        "sftrl figure fig4_layers --angle-table {input.table:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig_embed_lmhead:
    input:
        table=first_seed("tables/embed_lmhead.csv"),
        code=code("figure embed_lmhead"),
    output:
        pdf=f"{RESULTS}/figs/embed_lmhead.pdf",
        png=report(f"{RESULTS}/figs/embed_lmhead.png", caption="../report/embed_lmhead.rst",
                   category="4. Spectral analysis", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/embed_lmhead.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/embed_lmhead.tsv"
    shell:
        "sftrl figure embed_lmhead --embed-table {input.table:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig_drift:
    input:
        table=first_seed("tables/drift.csv"),
        correlation=first_seed("tables/drift_correlation.json"),
        code=code("figure drift"),
    output:
        pdf=f"{RESULTS}/figs/drift.pdf",
        png=report(f"{RESULTS}/figs/drift.png", caption="../report/drift.rst",
                   category="5. Rotation drift", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/drift.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/figs/drift.tsv"
    shell:
        "sftrl figure drift --drift-table {input.table:q} --correlation {input.correlation:q}"
        " --out {params.stem:q} > {log:q} 2>&1"
