# sftrl: how SFT and RL fine-tuning reshape an LLM (GeneralPoints; arXiv 2508.16546 / 2509.12235).
# Thin entry point: config + schema validation live in common.smk, one .smk per stage.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# `snakemake --report results/report.html` (make report): this text on the front page, the outputs the rules flag
# with report(...) grouped by stage, each with its caption from workflow/report/.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base_plan.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/sft_plan.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/eval_plan.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/spectral_plan.smk"
include: "workflow/rules/spectral.smk"
include: "workflow/rules/rl_plan.smk"
include: "workflow/rules/rl.smk"
include: "workflow/rules/restore_plan.smk"
include: "workflow/rules/restore.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/report_plan.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
