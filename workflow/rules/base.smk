# The embedded base model: a tiny Llama pretrained on a generated corpus (sftrl.pretrain), and its ability probe.


rule pretrain_base:
    input:
        code=library("pretrain", "corpus", "modeling"),
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        settings=settings("base"),
        # Resumable state lives outside the declared output, which Snakemake deletes before a job starts.
        state_dir=f"{RESULTS}/work/pretrain",
    log:
        loss=f"{RESULTS}/base/pretrain_loss.csv",
        main="logs/base/pretrain.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/base/pretrain.tsv"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "sftrl pretrain --settings {params.settings:q} --out {output} --state-dir {params.state_dir}"
        " --loss-log {log.loss} --threads {threads} > {log.main} 2>&1"


rule probe_base:
    input:
        model=f"{RESULTS}/models/base",
        code=library("probe", "generation", "evaluate"),
    output:
        report=f"{RESULTS}/base/abilities.json",
        figure=multiext(f"{RESULTS}/figs/base_abilities", ".pdf", ".png"),
    params:
        settings=settings("base", "probe"),
        # only the eval knobs the probe uses, so an eval sampling sweep does not rerun the probe
        eval_settings=json.dumps({k: config["eval"][k] for k in ("batch_size", "max_new_tokens")}, sort_keys=True),
        target=lookup(dpath="env/target", within=config),
        verify_iter=lookup(dpath="env/verify_iter", within=config),
        stem=lambda wc, output: os.path.splitext(output.figure[0])[0],
    log:
        "logs/base/probe.log",
    conda:
        "../envs/train.yaml"
    threads: workflow.cores
    shell:
        "sftrl probe --model {input.model} --settings {params.settings:q} --eval-settings {params.eval_settings:q}"
        " --target {params.target} --verify-iter {params.verify_iter} --out {output.report}"
        " --figure {params.stem} > {log} 2>&1"
