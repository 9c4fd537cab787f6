# The report stage's plan, for report.smk's rules: the claims table's inputs. (Snakemake's lint wants functions apart
# from rules: each stage's plan is its own file, included just before its rules.)

def claims_inputs(wildcards):
    """Every table a claim reads; a function, so the sweeps are known once every rule (rl too) is defined."""
    tables = [f"tables/spectral_{table}.csv" for table in ("sigma", "angles")]
    tables += [f"tables/restore_{sweep}.csv" for sweep in restore_sweeps()]
    return {"eval_tables": each_seed("tables/eval.csv"), "selections": each_seed("sft/selection.json"),
            "tables": [f"{seed_dir(RESULTS, seed)}/{table}" for seed in SEEDS for table in tables],
            "code": code("claims")}
