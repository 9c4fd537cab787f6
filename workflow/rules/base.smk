# The embedded base model (sftrl.base): a tiny Llama pretrained on a generated corpus — trained once and shipped in
# resources/base/ (config base.shipped; installed after its manifest is checked), or pretrained here when
# base.shipped is null — and its ability probe.


rule pretrain_base:
    input:
        code=code("pretrain"),
        # config base.shipped: the shipped copy's files (replacing one reruns the install)
        shipped=shipped_base_files(),
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        settings=settings("base"),
        # Resumable state lives outside the declared output, which Snakemake deletes before a job starts.
        state_dir=f"{RESULTS}/work/pretrain",
        # an argument list (rendered with :q, one quoted word each); none when pretraining
        shipped=["--shipped", shipped_base_dir()] if shipped_base_dir() else [],
    log:
        loss=f"{RESULTS}/base/pretrain_loss.csv",
        main="logs/base/pretrain.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/base/pretrain.tsv"
    threads: ALL_CORES
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "sftrl pretrain --settings {params.settings:q} --out {output:q} --state-dir {params.state_dir:q}"
        " --loss-log {log.loss:q} --threads {threads} {params.shipped:q} > {log.main:q} 2>&1"


rule probe_base:
    input:
        model=f"{RESULTS}/models/base",
        rule_reading_hands=f"{RESULTS}/data/rule_reading_hands.jsonl",
        code=code("probe"),
    output:
        report(f"{RESULTS}/base/abilities.json", caption="../report/table_abilities.rst", category="2. Base model",
               subcategory="Tables"),
    params:
        settings=settings("base", "probe"),
        eval_settings=json.dumps({k: config["eval"][k] for k in PROBE_EVAL_KEYS}, sort_keys=True),
        model_settings=settings("model"),
        target=lookup(dpath="env/target", within=config),
        verify_iter=lookup(dpath="env/verify_iter", within=config),
        rule_reading_batch_size=lookup(dpath="rule_reading/batch_size", within=config),
    log:
        "logs/base/probe.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/base/probe.tsv"
    threads: ALL_CORES
    shell:
        "OMP_NUM_THREADS={threads} sftrl probe --model {input.model:q} --settings {params.settings:q}"
        " --eval-settings {params.eval_settings:q} --model-settings {params.model_settings:q}"
        " --target {params.target:q} --verify-iter {params.verify_iter:q} --rule-reading-hands {input.rule_reading_hands:q}"
        " --rule-reading-batch-size {params.rule_reading_batch_size:q} --out {output:q} > {log:q} 2>&1"
