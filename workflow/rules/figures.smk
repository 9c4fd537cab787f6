# The figures (sftrl.figures), each as PDF + PNG, drawn only from the tidy tables and reports. The PNG of each
# is flagged for the HTML report (`make report`; it renders inline, a PDF would need a viewer), with its caption
# from workflow/report/. A figure over SFT, RL or restoration draws every replicate seed (config seeds: thin lines
# around their mean); the spectral ones draw the first seed's weights (spectral_plan.smk first_seed).


rule fig1:
    input:
        tables=each_seed("tables/eval.csv"),
        selections=each_seed("sft/selection.json"),
        code=code("figure fig1"),
    output:
        pdf=f"{RESULTS}/figs/fig1.pdf",
        png=report(f"{RESULTS}/figs/fig1.png", caption="../report/fig1.rst",
                   category="3. SFT and evaluation", subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
        expect_rows=expected_eval_rows(),  # the rows each table must hold (a damaged table fails, naming them)
    log:
        "logs/figs/fig1.log",
    benchmark:
        "benchmarks/figs/fig1.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig1 --seeds {params.seeds:q} --eval-table {input.tables:q} --selection {input.selections:q}"
        " --out {params.stem:q} --expect-rows {params.expect_rows:q} > {log:q} 2>&1"


rule fig2:
    input:
        losses=each_seed("tables/sft_loss.csv"),
        code=code("figure fig2"),
    output:
        pdf=f"{RESULTS}/figs/fig2.pdf",
        png=report(f"{RESULTS}/figs/fig2.png", caption="../report/fig2.rst",
                   category="3. SFT and evaluation", subcategory="Figures"),
    params:
        stem=stem,
        seeds=SEEDS,
    log:
        "logs/figs/fig2.log",
    benchmark:
        "benchmarks/figs/fig2.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure fig2 --seeds {params.seeds:q} --loss-table {input.losses:q} --out {params.stem:q} > {log:q} 2>&1"


rule fig_base_abilities:
    input:
        abilities=f"{RESULTS}/base/abilities.json",
        code=code("figure abilities"),
    output:
        pdf=f"{RESULTS}/figs/base_abilities.pdf",
        png=report(f"{RESULTS}/figs/base_abilities.png", caption="../report/base_abilities.rst",
                   category="2. Base model", subcategory="Figures"),
    params:
        stem=stem,
    log:
        "logs/figs/base_abilities.log",
    benchmark:
        "benchmarks/figs/base_abilities.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl figure abilities --abilities {input.abilities:q} --out {params.stem:q} > {log:q} 2>&1"
