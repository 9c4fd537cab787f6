# The eval stage's plan, for eval.smk's rules: the evaluation table's inputs. (Snakemake's lint wants functions apart
# from rules: each stage's plan is its own file, included just before its rules.)

def eval_table_checkpoints(wildcards):
    """Base and SFT, then every RL checkpoint of the {seed} replicate (rl.smk; known once its select_sft has run
    when RL starts from a selection)."""
    return evaluated_checkpoints() + rl_checkpoints(wildcards.seed)


def eval_table_summaries(wildcards):
    return [f"{results_dir('eval', ckpt, wildcards.seed)}/{split}.summary.json"
            for ckpt in eval_table_checkpoints(wildcards) for split in SPLITS]


def eval_table_measures(wildcards):
    """The rule-reading / NLL report of every checkpoint eval_table_summaries lists."""
    return [f"{results_dir('eval', ckpt, wildcards.seed)}/rule_reading.json"
            for ckpt in eval_table_checkpoints(wildcards)]
