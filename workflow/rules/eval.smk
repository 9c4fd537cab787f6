# Rollout evaluation of every checkpoint on the fixed ID and OOD problem sets (sftrl.evaluation), its rule-reading
# probe and SFT-loss-set NLL (forward passes only), each replicate's tidy results table every figure reads (base, SFT
# and RL rows), and its data-dependent Inter_SFT / End_SFT selection (from the base + SFT table, since the RL runs
# depend on it). A replicate's checkpoints are evaluated under results/seed-<s>/eval/ with the replicate's sampling
# seed; the shared base once, under results/eval/base/, with eval.seed (`use rule ... as *_base`).


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
        settings=seeded_settings("eval"),
        model_settings=settings("model"),
        verify_iter=lookup(dpath="env/verify_iter", within=config),
        run=config["run"],
    wildcard_constraints:
        ckpt=REPLICATE_NAME_PATTERN,
    log:
        "logs/seed-{seed}/eval/{ckpt}.log",
    conda:
        # hf backend: the training env; eval.backend = vllm needs ../envs/vllm.yaml (set per rule on the cluster)
        "../envs/train.yaml"
    benchmark:
        "benchmarks/seed-{seed}/eval/{ckpt}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        "OMP_NUM_THREADS={threads} sftrl eval --model {input.model:q} --problems {input.problems:q}"
        " --settings {params.settings:q} --model-settings {params.model_settings:q}"
        " --verify-iter {params.verify_iter:q} --run {params.run:q} --checkpoint {wildcards.ckpt:q}"
        " --out {output.episodes:q} --summary {output.summaries:q} > {log:q} 2>&1"


use rule eval_checkpoint as eval_base with:
    output:
        episodes=[f"{results_dir('eval', seed=None)}/{split}.jsonl" for split in SPLITS],
        summaries=[f"{results_dir('eval', seed=None)}/{split}.summary.json" for split in SPLITS],
    params:
        settings=settings("eval"),
    wildcard_constraints:
        ckpt="base",
    log:
        "logs/eval/{ckpt}.log",
    benchmark:
        "benchmarks/eval/{ckpt}.tsv"


rule rule_reading_hands:
    input:
        code=code("data rule-reading-hands"),
    output:
        f"{RESULTS}/data/rule_reading_hands.jsonl",
    params:
        n=lookup(dpath="rule_reading/n", within=config),
        seed=lookup(dpath="data/eval/seed", within=config),
        hands=lookup(dpath="data/eval/hands", within=config),
        target=lookup(dpath="env/target", within=config),
    log:
        "logs/data/rule_reading_hands.log",
    benchmark:
        "benchmarks/data/rule_reading_hands.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl data rule-reading-hands --n {params.n:q} --seed {params.seed:q} --hands {params.hands:q}"
        " --target {params.target:q} --out {output:q} > {log:q} 2>&1"


rule rule_reading:
    input:
        model=checkpoint_model,
        hands=f"{RESULTS}/data/rule_reading_hands.jsonl",
        id_loss=f"{RESULTS}/data/sft/id_test.jsonl",
        ood_loss=f"{RESULTS}/data/sft/ood_loss.jsonl",
        code=code("rule-reading"),
    output:
        # json prefix (what SFT teaches) for every model; the base's own-notation prefix is in its abilities
        f"{results_dir('eval')}/rule_reading.json",
    params:
        settings=settings("rule_reading"),
        model_settings=settings("model"),
        chat_format=lookup(dpath="sft/chat_format", within=config),
        target=lookup(dpath="env/target", within=config),
        run=config["run"],
    wildcard_constraints:
        ckpt=REPLICATE_NAME_PATTERN,
    log:
        "logs/seed-{seed}/eval/{ckpt}.rule_reading.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/seed-{seed}/eval/{ckpt}.rule_reading.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "OMP_NUM_THREADS={threads} sftrl rule-reading --model {input.model:q} --hands {input.hands:q} --prefixes json"
        " --id-loss-set {input.id_loss:q} --ood-loss-set {input.ood_loss:q} --chat-format {params.chat_format:q}"
        " --settings {params.settings:q} --model-settings {params.model_settings:q} --target {params.target:q}"
        " --run {params.run:q} --checkpoint {wildcards.ckpt:q} --out {output:q} > {log:q} 2>&1"


use rule rule_reading as rule_reading_base with:
    output:
        f"{results_dir('eval', seed=None)}/rule_reading.json",
    wildcard_constraints:
        ckpt="base",
    log:
        "logs/eval/{ckpt}.rule_reading.log",
    benchmark:
        "benchmarks/eval/{ckpt}.rule_reading.tsv"


rule eval_table_sft:
    input:
        summaries=[
            f"{results_dir('eval', ckpt)}/{split}.summary.json"
            for ckpt in evaluated_checkpoints()
            for split in SPLITS
        ],
        measures=[f"{results_dir('eval', ckpt)}/rule_reading.json" for ckpt in evaluated_checkpoints()],
        code=code("table"),
    output:
        # base and SFT only: what select_sft reads (the RL runs it starts are evaluated after it)
        seeded("tables/eval_sft.csv"),
    log:
        "logs/seed-{seed}/eval/table_sft.log",
    benchmark:
        "benchmarks/seed-{seed}/eval/table_sft.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl table {input.summaries:q} --measures {input.measures:q} --out {output:q} > {log:q} 2>&1"


rule eval_table:
    input:
        summaries=eval_table_summaries,
        measures=eval_table_measures,
        code=code("table"),
    output:
        report(seeded("tables/eval.csv"), caption="../report/table_eval.rst", category="3. SFT and evaluation",
               subcategory="Tables"),
    log:
        "logs/seed-{seed}/eval/table.log",
    benchmark:
        "benchmarks/seed-{seed}/eval/table.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl table {input.summaries:q} --measures {input.measures:q} --out {output:q} > {log:q} 2>&1"


checkpoint select_sft:
    input:
        table=seeded("tables/eval_sft.csv"),
        losses=seeded("tables/sft_loss.csv"),
        code=code("select"),
    output:
        report(seeded("sft/selection.json"), caption="../report/table_selection.rst",
               category="3. SFT and evaluation", subcategory="Tables"),
    params:
        end_sft=lookup(dpath="selection/end_sft", within=config),
        expect_rows=expected_eval_rows(rl=False),
    log:
        "logs/seed-{seed}/sft/select.log",
    benchmark:
        "benchmarks/seed-{seed}/sft/select.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl select --table {input.table:q} --losses {input.losses:q} --end-sft {params.end_sft:q} --out {output:q}"
        " --expect-rows {params.expect_rows:q} > {log:q} 2>&1"
