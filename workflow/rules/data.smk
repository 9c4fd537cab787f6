# Fixed evaluation problem sets and SFT data (sftrl.task.data).


rule eval_set:
    input:
        code=code("data eval-set"),
    output:
        f"{RESULTS}/data/eval_{{split}}.jsonl",
    params:
        n=lookup(dpath="data/eval/n", within=config),
        seed=lookup(dpath="data/eval/seed", within=config),
        hands=lookup(dpath="data/eval/hands", within=config),
        target=lookup(dpath="env/target", within=config),
    log:
        "logs/data/eval_{split}.log",
    benchmark:
        "benchmarks/data/eval_{split}.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl data eval-set --rule {wildcards.split:q} --n {params.n:q} --seed {params.seed:q}"
        " --hands {params.hands:q} --target {params.target:q} --out {output:q} > {log:q} 2>&1"


rule sft_data:
    input:
        code=code("data sft"),
    output:
        train=f"{RESULTS}/data/sft/train.jsonl",
        train_loss=f"{RESULTS}/data/sft/train_loss.jsonl",
        id_test=f"{RESULTS}/data/sft/id_test.jsonl",
        ood_loss=f"{RESULTS}/data/sft/ood_loss.jsonl",
        summary=f"{RESULTS}/data/sft/summary.json",
    params:
        settings=settings("data", "sft"),
        target=lookup(dpath="env/target", within=config),
        out_dir=lambda wc, output: os.path.dirname(output.train),
    log:
        "logs/data/sft.log",
    benchmark:
        "benchmarks/data/sft.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl data sft --settings {params.settings:q} --target {params.target:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
