"""The RL part of the DAG, by dry run only (seconds): one figure schedules just what it draws."""
from helpers import make_workdir, planned_jobs, snakemake


def test_recovery_window_figure_schedules_only_what_it_needs(tmp_path):
    workdir = make_workdir(tmp_path)
    jobs = planned_jobs(snakemake(workdir, "-n", "--cores", "2", "results/figs/recovery_window.pdf"))
    # before select_sft has run, the plan stops at the selection (the RL runs it starts are added after it, then the
    # replicate's evaluation table the figure reads); the table select_sft reads carries each checkpoint's rule
    # reading: its hand set and one job per checkpoint (the shared base's by its own rules)
    assert set(jobs) == {"eval_set", "pretrain_base", "sft_data", "sft", "eval_base", "eval_checkpoint",
                         "eval_table_sft", "rule_reading_hands", "rule_reading_base", "rule_reading", "select_sft",
                         "eval_table", "fig_recovery_window"}
    assert "probe_base" not in jobs and "svd" not in jobs and "rl_log" not in jobs
