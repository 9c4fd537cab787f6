# The eval stage's plan, for eval.smk's rules: the evaluation table's inputs. (Snakemake's lint wants functions apart
# from rules: each stage's plan is its own file, included just before its rules.)

def eval_table_summaries(wildcards):
    """Base and SFT, then every RL checkpoint (rl.smk; known once select_sft has run when RL starts from a
    selection)."""
    ckpts = evaluated_checkpoints() + rl_checkpoints()
    return [f"{results_dir('eval', ckpt)}/{split}.summary.json" for ckpt in ckpts for split in SPLITS]


def eval_table_measures(wildcards):
    """The rule-reading / NLL report of every checkpoint eval_table_summaries lists."""
    return [f"{results_dir('eval', ckpt)}/rule_reading.json" for ckpt in evaluated_checkpoints() + rl_checkpoints()]
