# Helpers shared by all .smk files: config validation, model-directory resolution, params as JSON.
import json
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml", set_default=True)

# Never reach the Hub from any job (jobs inherit this environment); local paths only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = "results"
LIBRARY = os.path.join(workflow.basedir, "src", "sftrl")
SPLITS = ["id", "ood"]


def settings(*keys):
    """A config section as one JSON string: a builtin-typed `params:` value, so Snakemake's params rerun trigger
    sees every knob of the section, and the library gets exactly what the config says."""
    section = config
    for key in keys:
        section = section[key]
    return json.dumps(section, sort_keys=True)


def library(*modules):
    """The library modules a rule's computation lives in, as inputs: editing one reruns the rule's jobs (and what
    depends on them). Snakemake compares checksums of small inputs, so a mere touch or checkout does not."""
    return [os.path.join(LIBRARY, f"{module}.py") for module in modules]


def real_model_dir():
    """config model.path, checked at parse time so a bad path fails before any job runs, naming the path."""
    path = config["model"]["path"]
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise WorkflowError(
            f"config model.path = {path!r} is not a readable Hugging Face model directory "
            "(expected a folder with config.json)"
        )
    return path


def base_model_dir():
    """The base model every stage starts from: the embedded tiny model built by `pretrain_base`, or a real one."""
    if config["model"]["path"]:
        return real_model_dir()
    return f"{RESULTS}/models/base"


def sft_steps():
    """Checkpoint steps SFT writes: every sft.save_steps up to sft.max_steps (the last one always)."""
    save, last = config["sft"]["save_steps"], config["sft"]["max_steps"]
    steps = list(range(save, last + 1, save))
    return steps if steps and steps[-1] == last else steps + [last]


def model_dir(stage, step):
    if stage == "base":
        return base_model_dir()
    if stage == "sft":
        return f"{RESULTS}/sft/checkpoint-{step}"
    raise WorkflowError(f"unknown stage {stage!r} (expected base or sft)")


def eval_points():
    """(stage, step) of every model evaluated along SFT: the base at step 0, then each SFT checkpoint."""
    return [("base", 0)] + [("sft", step) for step in sft_steps()]


def all_targets():
    targets = [
        f"{RESULTS}/tables/eval.csv",
        f"{RESULTS}/figs/fig1.pdf",
        f"{RESULTS}/figs/fig2.pdf",
    ]
    if not config["model"]["path"]:
        targets.append(f"{RESULTS}/base/abilities.json")
    return targets + spectral_targets()


# -----------------------------------------------------------------------------
# Spectral analysis (spectral.smk): which matrices, in which SVD shards, for which checkpoints

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
        import sys

        sys.path.insert(0, os.path.join(workflow.basedir, "src"))  # parse with the workflow's own library
        from sftrl.analysis import checkpoint_parameter_names, llama_parameter_names, shard_plan
        from sftrl.spectral import layer_index, matrix_kind

        if config["model"]["path"]:
            names = checkpoint_parameter_names(real_model_dir())
        else:
            names = llama_parameter_names(config["base"]["architecture"]["num_layers"])
        try:
            _SVD_SHARDS.update(shard_plan(names, config["spectral"]))
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


def svd_files(stage, step, shards=None):
    """The SVD cache files of one checkpoint (all shards, or the named ones)."""
    return [f"{RESULTS}/svd/{stage}/step-{step}/{shard}.safetensors" for shard in (shards or svd_shards())]


def svd_embed_shard():
    """The shard holding embed_tokens and lm_head, or None when the selection lacks either."""
    from sftrl.spectral import matrix_kind

    kinds = {matrix_kind(name) for name in svd_shards().get("embed", [])}
    return "embed" if {"embed_tokens", "lm_head"} <= kinds else None


def resolve_point(name):
    """A configured checkpoint name -> (stage, step): base, sft-<step>, or inter_sft / end_sft from the
    select_sft checkpoint (raises IncompleteCheckpointException until it has run, which Snakemake handles)."""
    if name == "base":
        return "base", 0
    if name.startswith("sft-"):
        step = int(name[len("sft-"):])
        if step not in sft_steps():
            raise WorkflowError(f"config spectral.pairs: {name} is not a saved SFT step {sft_steps()}")
        return "sft", step
    if name in ("inter_sft", "end_sft"):
        with checkpoints.select_sft.get().output[0].open() as f:
            return "sft", int(json.load(f)[name]["step"])
    raise WorkflowError(f"config spectral.pairs: unknown checkpoint name {name!r}")


def point_name(stage, step):
    """(stage, step) -> the concrete checkpoint name used in results/spectral/{ref}/{tgt}/ (base, sft-<step>)."""
    return "base" if stage == "base" else f"{stage}-{step}"


def spectral_pair_inputs(wildcards):
    """Model directories and SVD shards of a concrete pair (base / sft-<step>; no selection needed)."""
    inputs = {"code": library("spectral", "analysis")}
    for role in ("ref", "tgt"):
        stage, step = resolve_point(getattr(wildcards, role))
        inputs[f"{role}_model"] = model_dir(stage, step)
        inputs[f"{role}_svd"] = svd_files(stage, step)
    return inputs


def spectral_pairs():
    return [tuple(pair) for pair in config["spectral"]["pairs"]]


def spectral_tables_inputs(wildcards):
    """Per-pair tables of every configured pair, in config order (sigma, angles, energy per pair), with the
    names inter_sft / end_sft resolved through the select_sft checkpoint."""
    tables = []
    for ref, tgt in spectral_pairs():
        concrete = [point_name(*resolve_point(name)) for name in (ref, tgt)]
        tables += [f"{RESULTS}/spectral/{concrete[0]}/{concrete[1]}/{table}.csv" for table in SPECTRAL_TABLES]
    inputs = {"tables": tables, "code": library("analysis")}
    if {name for pair in spectral_pairs() for name in pair} & {"inter_sft", "end_sft"}:
        inputs["selection"] = checkpoints.select_sft.get().output[0]
    return inputs


def spectral_targets():
    targets = [f"{RESULTS}/tables/spectral_{table}.csv" for table in SPECTRAL_TABLES]
    targets += [f"{RESULTS}/tables/drift.csv", f"{RESULTS}/tables/drift_correlation.json"]
    targets += [f"{RESULTS}/figs/{name}.pdf" for name in ("fig3", "fig4", "fig4_layers", "drift")]
    if svd_embed_shard():
        targets += [f"{RESULTS}/tables/embed_lmhead.csv", f"{RESULTS}/figs/embed_lmhead.pdf"]
    return targets


def sft_launcher():
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config sft.launcher)."""
    if config["sft"]["launcher"] == "accelerate":
        n = config["sft"]["num_processes"]
        return f"accelerate launch --num_processes {n} -m sftrl.cli"
    return "sftrl"


def stem(wildcards, output):
    """Figure stem (path without extension) of a multiext() output pair."""
    return os.path.splitext(output[0])[0]
