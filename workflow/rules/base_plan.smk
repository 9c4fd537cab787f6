# The base stage's plan, for base.smk's rules: the shipped base's files. (Snakemake's lint wants functions apart from
# rules: each stage's plan is its own file, included just before its rules.)

def shipped_base_files():
    """The shipped base's files (inputs of pretrain_base); a missing copy fails at parse time, naming the key."""
    shipped = shipped_base_dir()
    if shipped is None:
        return []
    if not os.path.isfile(os.path.join(shipped, "MANIFEST.json")):
        raise WorkflowError(f"config base.shipped = {config['base']['shipped']!r}: no shipped base there "
                            f"({shipped}/MANIFEST.json missing); set base.shipped: null to pretrain")
    return sorted(os.path.join(shipped, name) for name in os.listdir(shipped))


# The eval knobs the base probe uses (its backend, batch and stop tokens): an eval sampling sweep does not rerun it.
PROBE_EVAL_KEYS = ("backend", "batch_size", "max_new_tokens", "stop_tokens")
