# The study's report (sftrl.report): results/SUMMARY.md, the headline table with links to every figure, written by
# the DAG; the HTML report is `snakemake --report results/report.html` (make report), built from the outputs that
# the stage rules flag with report(...) and the captions under workflow/report/; and the claims table, each of the
# paper's claims checked against this run's tables: per replicate seed, their mean and an interval over both.


rule claims:
    input:
        unpack(claims_inputs),
    output:
        table=report(f"{RESULTS}/tables/claims.csv", caption="../report/table_claims.rst",
                     category="6. Restoration", subcategory="Tables"),
        markdown=f"{RESULTS}/tables/claims.md",
    params:
        seeds=SEEDS,
        expect_rows=expected_eval_rows(),
    log:
        "logs/report/claims.log",
    conda:
        "../envs/analysis.yaml"
    benchmark:
        "benchmarks/report/claims.tsv"
    shell:
        "sftrl claims --seeds {params.seeds:q} --eval-table {input.eval_tables:q} --selection {input.selections:q}"
        " --tables {input.tables:q}"
        " --out {output.table:q} --markdown {output.markdown:q}"
        " --expect-rows {params.expect_rows:q} > {log:q} 2>&1"


rule summary:
    input:
        tables=each_seed("tables/eval.csv"),
        selections=each_seed("sft/selection.json"),
        # every figure (its PNG) and table the run makes, from all_targets(): the summary comes last, links them all
        figures=[t.removesuffix(".pdf") + ".png" for t in all_targets() if t.startswith(f"{RESULTS}/figs/")],
        other_tables=[t for t in all_targets() if t.endswith((".csv", ".json"))
                      and t not in each_seed("tables/eval.csv")]
        + each_seed("tables/sft_loss.csv"),
        code=code("summary"),
    output:
        summary=report(f"{RESULTS}/SUMMARY.md", caption="../report/summary.rst", category="1. Summary",
                       subcategory="Headline"),
        # the same headline as a page the HTML report shows inline (it offers Markdown and CSV only as downloads)
        html=report(f"{RESULTS}/tables/headline.html", caption="../report/headline.rst", category="1. Summary",
                    subcategory="Headline"),
    params:
        seeds=SEEDS,
        expect_rows=expected_eval_rows(),
    log:
        "logs/report/summary.log",
    benchmark:
        "benchmarks/report/summary.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "sftrl summary --seeds {params.seeds:q} --eval-table {input.tables:q} --selection {input.selections:q}"
        " --figures {input.figures:q} --tables {input.other_tables:q} --out {output.summary:q} --html {output.html:q}"
        " --expect-rows {params.expect_rows:q} > {log:q} 2>&1"
