# Rollout evaluation of every checkpoint on the fixed ID and OOD problem sets (sftrl.evaluation), the tidy results
# table every figure reads (base, SFT and RL rows), and the data-dependent Inter_SFT / End_SFT selection (from the
# base + SFT table, since the RL runs depend on it).


rule eval_checkpoint:
    input:
        model=checkpoint_model,
        problems=[f"{RESULTS}/data/eval_{split}.jsonl" for split in SPLITS],
        code=code("eval"),
    output:
        # both splits in one job: the model is loaded once (a vLLM engine started once on a GPU node)
        episodes=[f"{results_dir('eval')}/{split}.jsonl" for split in SPLITS],
        summaries=[f"{results_dir('eval')}/{split}.summary.json" for split in SPLITS],
    params:
        settings=settings("eval"),
        model_settings=settings("model"),
        verify_iter=lookup(dpath="env/verify_iter", within=config),
        run=config["run"],
    log:
        "logs/eval/{ckpt}.log",
    conda:
        # hf backend: the training env; eval.backend = vllm needs ../envs/vllm.yaml (set per rule on the cluster)
        "../envs/train.yaml"
    benchmark:
        "benchmarks/eval/{ckpt}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        "OMP_NUM_THREADS={threads} sftrl eval --model {input.model:q} --problems {input.problems:q}"
        " --settings {params.settings:q} --model-settings {params.model_settings:q}"
        " --verify-iter {params.verify_iter:q} --run {params.run:q} --checkpoint {wildcards.ckpt:q}"
        " --out {output.episodes:q} --summary {output.summaries:q} > {log:q} 2>&1"


rule eval_table_sft:
    input:
        summaries=[
            f"{results_dir('eval', ckpt)}/{split}.summary.json"
            for ckpt in evaluated_checkpoints()
            for split in SPLITS
        ],
        code=code("table"),
    output:
        # base and SFT only: what select_sft reads (the RL runs it starts are evaluated after it)
        f"{RESULTS}/tables/eval_sft.csv",
    log:
        "logs/eval/table_sft.log",
    benchmark:
        "benchmarks/eval/table_sft.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl table {input.summaries:q} --out {output:q} > {log:q} 2>&1"


rule eval_table:
    input:
        summaries=eval_table_summaries,
        code=code("table"),
    output:
        report(f"{RESULTS}/tables/eval.csv", caption="../report/table_eval.rst", category="3. SFT and evaluation",
               subcategory="Tables"),
    log:
        "logs/eval/table.log",
    benchmark:
        "benchmarks/eval/table.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl table {input.summaries:q} --out {output:q} > {log:q} 2>&1"


checkpoint select_sft:
    input:
        table=f"{RESULTS}/tables/eval_sft.csv",
        losses=f"{RESULTS}/tables/sft_loss.csv",
        code=code("select"),
    output:
        report(f"{RESULTS}/sft/selection.json", caption="../report/table_selection.rst",
               category="3. SFT and evaluation", subcategory="Tables"),
    params:
        end_sft=lookup(dpath="selection/end_sft", within=config),
        expect_rows=expected_eval_rows(rl=False),
    log:
        "logs/sft/select.log",
    benchmark:
        "benchmarks/sft/select.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl select --table {input.table:q} --losses {input.losses:q} --end-sft {params.end_sft:q} --out {output:q}"
        " --expect-rows {params.expect_rows:q} > {log:q} 2>&1"
