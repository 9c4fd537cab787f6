# The report stage's plan, for report.smk's rules: the claims table's inputs. (Snakemake's lint wants functions apart
# from rules: each stage's plan is its own file, included just before its rules.)

def claims_inputs(wildcards):
    """Every table a claim reads; a function, so the sweeps are known once every rule (rl too) is defined."""
    tables = [f"{RESULTS}/tables/spectral_{table}.csv" for table in ("sigma", "angles")]
    tables += [f"{RESULTS}/tables/restore_{sweep}.csv" for sweep in restore_sweeps()]
    return {"eval_table": f"{RESULTS}/tables/eval.csv", "selection": f"{RESULTS}/sft/selection.json",
            "tables": tables, "code": code("claims")}
