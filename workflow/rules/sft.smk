# Supervised fine-tuning (sftrl.train.sft): one job per replicate seed writes a checkpoint every sft.save_steps.


rule sft:
    input:
        model=base_model_dir(),
        train=f"{RESULTS}/data/sft/train.jsonl",
        train_loss=f"{RESULTS}/data/sft/train_loss.jsonl",
        id_test=f"{RESULTS}/data/sft/id_test.jsonl",
        ood_loss=f"{RESULTS}/data/sft/ood_loss.jsonl",
        code=code("sft"),
    output:
        checkpoints=[directory(model_dir(ckpt, "{seed}")) for ckpt in sft_checkpoints()],
        losses=report(seeded("tables/sft_loss.csv"), caption="../report/table_sft_loss.rst",
                      category="3. SFT and evaluation", subcategory="Tables"),
    params:
        settings=seeded_settings("sft"),
        model_settings=settings("model"),
        launcher=sft_launcher(),
        data_dir=lambda wc, input: os.path.dirname(input.train),
        export_dir=lambda wc, output: os.path.dirname(output.checkpoints[0]),
        # Trainer state (optimizer, RNG) for resume; outside the outputs, which Snakemake deletes before a run.
        work_dir=seeded("work/sft"),
    log:
        "logs/seed-{seed}/sft/sft.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/seed-{seed}/sft/sft.tsv"
    threads: ALL_CORES
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "{params.launcher:q} sft --model {input.model:q} --data-dir {params.data_dir:q} --settings {params.settings:q}"
        " --model-settings {params.model_settings:q} --work-dir {params.work_dir:q} --export-dir {params.export_dir:q}"
        " --loss-table {output.losses:q} --threads {threads} > {log:q} 2>&1"
