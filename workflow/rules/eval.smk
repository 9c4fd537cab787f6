# Rollout evaluation of every checkpoint on the fixed ID and OOD problem sets (sftrl.evaluate), the tidy results
# table every figure reads, and the data-dependent Inter_SFT / End_SFT selection.


rule eval_checkpoint:
    input:
        model=lambda wc: model_dir(wc.stage, int(wc.step)),
        problems=f"{RESULTS}/data/eval_{{split}}.jsonl",
        code=library("evaluate", "generation", "points"),
    output:
        episodes=f"{RESULTS}/eval/{{stage}}/step-{{step}}/{{split}}.jsonl",
        summary=f"{RESULTS}/eval/{{stage}}/step-{{step}}/{{split}}.summary.json",
    params:
        settings=settings("eval"),
        model_settings=settings("model"),
        verify_iter=lookup(dpath="env/verify_iter", within=config),
        run=config["run"],
    wildcard_constraints:
        stage="base|sft",
        step=r"\d+",
        split="id|ood",
    log:
        "logs/eval/{stage}/step-{step}/{split}.log",
    conda:
        # hf backend: the training env; eval.backend = vllm needs ../envs/vllm.yaml (set per rule on the cluster)
        "../envs/train.yaml"
    benchmark:
        "benchmarks/eval/{stage}/step-{step}/{split}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "OMP_NUM_THREADS={threads} sftrl eval --model {input.model} --problems {input.problems}"
        " --settings {params.settings:q} --model-settings {params.model_settings:q}"
        " --verify-iter {params.verify_iter} --run {params.run} --stage {wildcards.stage} --step {wildcards.step}"
        " --out {output.episodes} --summary {output.summary} > {log} 2>&1"


rule eval_table:
    input:
        summaries=[
            f"{RESULTS}/eval/{stage}/step-{step}/{split}.summary.json"
            for stage, step in eval_points()
            for split in SPLITS
        ],
        code=library("evaluate"),
    output:
        f"{RESULTS}/tables/eval.csv",
    log:
        "logs/eval/table.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl table {input.summaries} --out {output} > {log} 2>&1"


checkpoint select_sft:
    input:
        table=f"{RESULTS}/tables/eval.csv",
        code=library("select"),
    output:
        f"{RESULTS}/sft/selection.json",
    log:
        "logs/sft/select.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl select --table {input.table} --out {output} > {log} 2>&1"
