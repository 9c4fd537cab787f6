# The paper's figures (sftrl.figures), each as PDF + PNG, drawn only from the tidy tables.


rule fig1:
    input:
        table=f"{RESULTS}/tables/eval.csv",
        selection=f"{RESULTS}/sft/selection.json",
        code=library("figures"),
    output:
        multiext(f"{RESULTS}/figs/fig1", ".pdf", ".png"),
    params:
        stem=stem,
    log:
        "logs/figs/fig1.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig1 --eval-table {input.table} --selection {input.selection} --out {params.stem} > {log} 2>&1"


rule fig2:
    input:
        losses=f"{RESULTS}/tables/sft_loss.csv",
        code=library("figures"),
    output:
        multiext(f"{RESULTS}/figs/fig2", ".pdf", ".png"),
    params:
        stem=stem,
    log:
        "logs/figs/fig2.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig2 --loss-table {input.losses} --out {params.stem} > {log} 2>&1"
