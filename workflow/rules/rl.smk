# RL from chosen SFT checkpoints (sftrl.train: rl, ppo, grpo): one job per run `<algo>-from-<start>` and replicate
# seed, writing a checkpoint every rl.save_every updates; each checkpoint is evaluated by eval_checkpoint into the
# replicate's results/seed-<s>/tables/eval.csv.
# Runs: every algorithm in rl.algorithms from every rl.start_from checkpoint, and PPO from every rl.recovery_window
# step; inter_sft / end_sft resolve through the select_sft checkpoint, and a run named twice runs once.


# One definition for both arms: rl_grpo is rl_ppo with the arm's own items (`use rule ... with:` replaces named
# items one by one; outputs differ by the arm's update count). Each runs `sftrl rl <algo>`, whose code is its arm
# only (COMMANDS "rl ppo" -> sftrl.train.ppo:command, "rl grpo" -> sftrl.train.grpo:command).
rule rl_ppo:
    input:
        model=lambda wc: model_dir(Checkpoint.parse(wc.start), wc.seed),
        code=code("rl ppo"),
    output:
        checkpoints=[directory(seeded(f"rl/ppo-from-{{start}}/checkpoint-{u}")) for u in rl_updates("ppo")],
        log=seeded("rl/ppo-from-{start}/log.csv"),
    params:
        algo="ppo",
        settings=rl_settings("ppo"),
        model_settings=settings("model"),
        env_settings=settings("env"),
        data_settings=settings("data", "sft"),
        launcher=rl_launcher("ppo"),
        out_dir=lambda wc, output: os.path.dirname(output.log),
        # resumable state (weights, optimizer, log rows; PPO's value head, GRPO's RNG): outside the outputs,
        # which Snakemake deletes
        work_dir=lambda wc: f"{seed_dir(RESULTS, wc.seed)}/work/rl/ppo-from-{wc.start}",
    wildcard_constraints:
        start=r"base|sft-\d+",
    log:
        "logs/seed-{seed}/rl/ppo-from-{start}.log",
    conda:
        "../envs/train.yaml"
    benchmark:
        "benchmarks/seed-{seed}/rl/ppo-from-{start}.tsv"
    # one thread on CPU: two runs side by side use 2 cores better than one run with two threads (cpu_notes.md)
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher:q} rl {params.algo:q} --model {input.model:q}"
        " --start {wildcards.start:q} --settings {params.settings:q} --model-settings {params.model_settings:q}"
        " --env-settings {params.env_settings:q} --data-settings {params.data_settings:q}"
        " --out-dir {params.out_dir:q} --work-dir {params.work_dir:q} --log {output.log:q} --threads {threads}"
        " > {log:q} 2>&1"


use rule rl_ppo as rl_grpo with:
    input:
        model=lambda wc: model_dir(Checkpoint.parse(wc.start), wc.seed),
        code=code("rl grpo"),
    output:
        checkpoints=[directory(seeded(f"rl/grpo-from-{{start}}/checkpoint-{u}")) for u in rl_updates("grpo")],
        log=seeded("rl/grpo-from-{start}/log.csv"),
    params:
        algo="grpo",
        settings=rl_settings("grpo"),
        launcher=rl_launcher("grpo"),
        work_dir=lambda wc: f"{seed_dir(RESULTS, wc.seed)}/work/rl/grpo-from-{wc.start}",
    log:
        "logs/seed-{seed}/rl/grpo-from-{start}.log",
    benchmark:
        "benchmarks/seed-{seed}/rl/grpo-from-{start}.tsv"


rule rl_log:
    input:
        logs=rl_log_inputs,
        code=code("rl-log"),
    output:
        report(seeded("tables/rl_log.csv"), caption="../report/table_rl_log.rst", category="3b. RL",
               subcategory="Tables"),
    log:
        "logs/seed-{seed}/rl/rl_log.log",
    benchmark:
        "benchmarks/seed-{seed}/rl/rl_log.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl rl-log {input.logs:q} --out {output:q} > {log:q} 2>&1"


rule fig_recovery_window:
    input:
        tables=each_seed("tables/eval.csv"),
        selections=each_seed("sft/selection.json"),
        code=code("figure recovery_window"),
    output:
        pdf=f"{RESULTS}/figs/recovery_window.pdf",
        png=report(f"{RESULTS}/figs/recovery_window.png", caption="../report/recovery_window.rst", category="3b. RL",
                   subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
        expect_rows=expected_eval_rows(),
    log:
        "logs/figs/recovery_window.log",
    benchmark:
        "benchmarks/figs/recovery_window.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure recovery_window --seeds {params.seeds:q} --eval-table {input.tables:q}"
        " --selection {input.selections:q} --expect-rows {params.expect_rows:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig1b:
    input:
        tables=each_seed("tables/eval.csv"),
        selections=each_seed("sft/selection.json"),
        code=code("figure fig1b"),
    output:
        pdf=f"{RESULTS}/figs/fig1b.pdf",
        png=report(f"{RESULTS}/figs/fig1b.png", caption="../report/fig1b.rst", category="3b. RL",
                   subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
        expect_rows=expected_eval_rows(),
    log:
        "logs/figs/fig1b.log",
    benchmark:
        "benchmarks/figs/fig1b.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig1b --seeds {params.seeds:q} --eval-table {input.tables:q} --selection {input.selections:q}"
        " --out {params.stem:q} --expect-rows {params.expect_rows:q} > {log:q} 2>&1"
