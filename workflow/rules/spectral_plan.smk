# The spectral stage's plan (spectral.smk's rules): which matrices, in which SVD shards (known at parse time), the
# SVD cache files of a checkpoint, the configured pairs resolved to concrete checkpoints, the stage's targets.
# (Its own file: with the rules it would pass 300 lines.) svd_files is restore.smk's too (input functions only).

SPECTRAL_TABLES = ["sigma", "angles", "energy"]
_SVD_SHARDS = {}


def spectral_settings(*keys):
    """Only the named keys of config `spectral` as one JSON string: a rule's params then carry exactly the knobs
    it uses (changing top_r reruns the angle tables, not the SVDs)."""
    return json.dumps({key: config["spectral"][key] for key in keys}, sort_keys=True)


def svd_shards():
    """Shard id -> parameter names (config spectral include / exclude / layers_per_shard), known at parse time:
    for the embedded model from base.architecture (transformers' Llama naming), for a real model from its
    safetensors header / index. Every checkpoint of a run has the base's parameter names."""
    if not _SVD_SHARDS:
        from sftrl.weights.names import layer_index, llama_parameter_ndims, matrix_kind, plan_shards
        from sftrl.weights.stored import checkpoint_parameter_ndims

        if config["model"]["path"]:
            names = checkpoint_parameter_ndims(real_model_dir())
        else:
            names = llama_parameter_ndims(config["base"]["architecture"]["num_layers"])
        try:
            spectral = config["spectral"]
            _SVD_SHARDS.update(plan_shards(names, spectral["layers_per_shard"], spectral["include"],
                                           spectral["exclude"]))
        except ValueError as e:
            raise WorkflowError(f"config spectral: {e}")
        # the figures' matrix choices must name analysed matrices: fail now, not after hours of SVDs
        analysed = [name for members in _SVD_SHARDS.values() for name in members]
        if config["spectral"]["angle_matrix"] not in analysed:
            raise WorkflowError(
                f"config spectral.angle_matrix = {config['spectral']['angle_matrix']!r} is not an analysed matrix "
                f"of this model (e.g. {[n for n in analysed if 'up_proj' in n][:1] or analysed[:1]})")
        layer = config["spectral"]["sigma_layer"]
        if not any(layer_index(name) == layer and matrix_kind(name) == "q_proj" for name in analysed):
            raise WorkflowError(f"config spectral.sigma_layer = {layer}: no analysed q_proj in that decoder layer")
    return _SVD_SHARDS


def cross_attention_layers():
    """The model's Mllama cross-attention decoder layers (none for Qwen, Llama and the embedded model), from the
    base's tensor names at parse time: the spectral tables flag them, the per-kind means leave them out."""
    if not config["model"]["path"]:
        return []
    from sftrl.weights.names import cross_attention_layers as layers
    from sftrl.weights.stored import checkpoint_parameter_names

    return sorted(layers(checkpoint_parameter_names(real_model_dir())))


def svd_files(ckpt, seed="{seed}", shards=None):
    """The SVD cache files of one checkpoint of replicate `seed` (all shards, or the named ones)."""
    return [f"{results_dir('svd', ckpt, seed)}/{shard}.safetensors" for shard in (shards or svd_shards())]


def svd_embed_shard():
    """The shard holding embed_tokens and lm_head, or None when the selection lacks either."""
    from sftrl.weights.names import matrix_kind

    kinds = {matrix_kind(name) for name in svd_shards().get("embed", [])}
    return "embed" if {"embed_tokens", "lm_head"} <= kinds else None


def spectral_pairs():
    return [tuple(pair) for pair in config["spectral"]["pairs"]]


for _name in {name for pair in spectral_pairs() for name in pair} - set(SELECTIONS):
    check_name(_name, "spectral.pairs")


def spectral_pair_inputs(wildcards):
    """Model directories and SVD shards of a concrete pair (base / sft-<step>; no selection needed)."""
    inputs = {"code": code("spectral")}
    for role in ("ref", "tgt"):
        ckpt = resolve(getattr(wildcards, role), "spectral.pairs", wildcards.seed)
        inputs[f"{role}_model"] = model_dir(ckpt, wildcards.seed)
        inputs[f"{role}_svd"] = svd_files(ckpt, wildcards.seed)
    return inputs


def spectral_tables_inputs(wildcards):
    """Per-pair tables of every configured pair, in config order (sigma, angles, energy per pair), with the
    names inter_sft / end_sft resolved through the select_sft checkpoint."""
    tables, seed = [], wildcards.seed
    for ref, tgt in spectral_pairs():
        concrete = [resolve(name, "spectral.pairs", seed).name for name in (ref, tgt)]
        if concrete[0] == concrete[1]:  # e.g. the best OOD checkpoint is the last one: Inter_SFT = End_SFT
            logger.warning(f"config spectral.pairs: {ref} and {tgt} are the same checkpoint ({concrete[0]}) in "
                           f"replicate seed {seed}; that pair compares a checkpoint with itself (all angles 0)")
        tables += [f"{seed_dir(RESULTS, seed)}/spectral/{concrete[0]}/{concrete[1]}/{table}.csv"
                   for table in SPECTRAL_TABLES]
    inputs = {"tables": tables, "code": code("spectral-collect")}
    if {name for pair in spectral_pairs() for name in pair} & set(SELECTIONS):
        inputs["selection"] = selection_file(seed)
    return inputs


def spectral_targets():
    tables = [f"tables/spectral_{table}.csv" for table in SPECTRAL_TABLES]
    tables += ["tables/drift.csv", "tables/drift_correlation.json"]
    figures = ["fig3", "fig4", "fig4_layers", "drift"]
    if svd_embed_shard():
        tables, figures = tables + ["tables/embed_lmhead.csv"], figures + ["embed_lmhead"]
    return [path for table in tables for path in each_seed(table)] + [f"{RESULTS}/figs/{name}.pdf" for name in figures]


def first_seed(path):
    """A replicate file of the first configured seed: what the spectral figures draw (one replicate's weights; the
    other replicates' tables sit beside it under results/seed-<s>/tables/)."""
    return each_seed(path)[0]
