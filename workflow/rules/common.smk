# Helpers shared by all .smk files: config validation, checkpoints (sftrl.checkpoint), code stamps from the import
# graph (sftrl.codegraph), params as JSON, the SVD shard plan. Parse time imports no torch (tests check it).
import importlib.util
import json
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml", set_default=True)

# Never reach the Hub from any job (jobs inherit this environment); local paths only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Parse with the workflow's own library (the one the code inputs below point at).
sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from sftrl import codegraph  # noqa: E402
from sftrl.checkpoint import NAME_PATTERN, RESULTS_DIR, SELECTIONS, Checkpoint, needs_selection  # noqa: E402
from sftrl.cli import command_module  # noqa: E402
from sftrl.checkpoint import ALGORITHMS  # noqa: E402
from sftrl.train.rl import TRAINERS, run_settings, save_updates  # noqa: E402  (numpy, no torch: parse-time safe)
from sftrl.restore.spec import SWEEPS, spec_json, sweep_points  # noqa: E402

RESULTS = "results"
SPLITS = ["id", "ood"]
# Rules that use every core of the machine they run on. A function, evaluated per job: Snakemake then needs no
# --cores to parse the workflow (`snakemake --unlock`, `--rulegraph` work without it).
ALL_CORES = lambda wildcards: workflow.cores  # noqa: E731


def _reject_duplicate_keys(path):
    """YAML keeps the last of two equal keys without a word; a config with one is a mistake: name it."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise WorkflowError(f"config file {path}, line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                                    "(YAML would silently keep only the last value)")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    with open(path) as f:
        yaml.load(f, Strict)


def _check_config():
    """Consistency checks the schema cannot express, at parse time: a mistake fails before any job runs, naming
    the key, not hours later in the job that first reads it."""
    import yaml

    from sftrl.config_checks import check_finite_numbers
    from sftrl.io import check_integer_keys
    from sftrl.task.data import check_data_settings

    for path in workflow.configfiles:
        if os.path.isfile(path):
            _reject_duplicate_keys(path)
    with open(os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")) as f:
        schema = yaml.safe_load(f)
    try:
        check_integer_keys(config, schema)  # JSON Schema takes 4.0 for an integer
        check_finite_numbers(config)  # and .nan / .inf pass its bounds
        check_data_settings(config["data"]["sft"], config["env"]["target"])  # hands that can be dealt at all
    except ValueError as e:
        raise WorkflowError(str(e))
    arch = config["base"]["architecture"]
    if not config["model"]["path"]:
        if arch["num_heads"] % arch["num_kv_heads"]:
            raise WorkflowError(f"config base.architecture.num_heads = {arch['num_heads']} is not a multiple of "
                                f"num_kv_heads = {arch['num_kv_heads']} (grouped-query attention)")
        if arch["hidden_size"] % arch["num_heads"]:
            raise WorkflowError(f"config base.architecture.hidden_size = {arch['hidden_size']} is not a multiple of "
                                f"num_heads = {arch['num_heads']}")
    sft = config["sft"]
    if sft["save_steps"] >= sft["max_steps"]:
        raise WorkflowError(f"config sft.save_steps = {sft['save_steps']} >= sft.max_steps = {sft['max_steps']}: SFT "
                            "would save a single checkpoint, so Inter_SFT and End_SFT could not differ")
    if sft["deepspeed"] and not os.path.isfile(sft["deepspeed"]):
        raise WorkflowError(f"config sft.deepspeed = {sft['deepspeed']!r}: no such DeepSpeed JSON file")
    for pair in config["spectral"]["pairs"]:
        if pair[0] == pair[1]:
            raise WorkflowError(f"config spectral.pairs: {pair} compares a checkpoint with itself")


_check_config()


def settings(*keys):
    """A config section as one JSON string: a builtin-typed `params:` value, so Snakemake's params rerun trigger
    sees every knob of the section, and the library gets exactly what the config says."""
    section = config
    for key in keys:
        section = section[key]
    return json.dumps(section, sort_keys=True)


_CODE_STAMPS = {}


def code(*commands):
    """Inputs for the code the `sftrl` command(s) of a job run. One stamp, a small file, per command, holding the hash
    of the code of its module and everything it imports, transitively (sftrl.codegraph), docstrings and comments
    left out. A stamp is rewritten only when that hash changes, so a code edit reruns exactly the rules whose
    command runs the edited code (and what depends on them); a docstring or comment edit, a touch, a checkout or
    moving the project (stamps are relative to the work directory, hashes keyed by module name) reruns nothing."""
    stamps = []
    for command in commands:
        if command not in _CODE_STAMPS:
            stamp = f"{RESULTS}/code/{command.replace(' ', '-')}.stamp"
            codegraph.write_stamp(stamp, [command_module(command)])
            _CODE_STAMPS[command] = stamp
        stamps.append(_CODE_STAMPS[command])
    return stamps


def real_model_dir():
    """config model.path, checked at parse time so a bad path fails before any job runs, naming the path (and the
    files it lacks)."""
    from sftrl.config_checks import missing_model_files

    path = config["model"]["path"]
    if not os.path.isdir(path):
        raise WorkflowError(f"config model.path = {path!r} is not a readable Hugging Face model directory "
                            "(expected a folder with config.json)")
    missing = missing_model_files(path)
    if missing:
        raise WorkflowError(f"config model.path = {path!r} lacks {'; '.join(missing)}")
    return path


def check_with_model():
    """The config against the model's shapes (spectral.top_r; restore layers / matrices), tokenizer
    (eval.stop_tokens) and context (env.verify_iter x max_new_tokens), at parse time (sftrl.config_checks). The
    tokenizer is a real model's or the shipped base's; a base pretrained here has none yet (its first eval job
    checks the stop tokens)."""
    from sftrl.config_checks import check_with_model as check

    model = real_model_dir() if config["model"]["path"] else None
    try:
        warnings = check(config, model, model or shipped_base_dir())
    except ValueError as e:
        raise WorkflowError(str(e) if str(e).startswith("config ") else f"config {e}")
    for warning in warnings:
        logger.warning(warning)


def base_model_dir():
    """The base model every stage starts from: the embedded tiny model built by `pretrain_base`, or a real one."""
    if config["model"]["path"]:
        return real_model_dir()
    return f"{RESULTS}/models/base"


def shipped_base_dir():
    """config base.shipped (relative to the repository), or None; as a path relative to the work directory, so a
    completed run moved with its repository keeps its inputs and params (absolute, it would rerun everything)."""
    shipped = config["base"].get("shipped")
    if not shipped or config["model"]["path"]:
        return None
    return os.path.relpath(os.path.join(workflow.basedir, shipped))


def shipped_base_files():
    """The shipped base's files (inputs of pretrain_base); a missing copy fails at parse time, naming the key."""
    shipped = shipped_base_dir()
    if shipped is None:
        return []
    if not os.path.isfile(os.path.join(shipped, "MANIFEST.json")):
        raise WorkflowError(f"config base.shipped = {config['base']['shipped']!r}: no shipped base there "
                            f"({shipped}/MANIFEST.json missing); set base.shipped: null to pretrain")
    return sorted(os.path.join(shipped, name) for name in os.listdir(shipped))


def sft_steps():
    """Checkpoint steps SFT writes: every sft.save_steps up to sft.max_steps (the last one always)."""
    save, last = config["sft"]["save_steps"], config["sft"]["max_steps"]
    steps = list(range(save, last + 1, save))
    return steps if steps and steps[-1] == last else steps + [last]


check_with_model()


if config["selection"]["end_sft"] != "last" and config["selection"]["end_sft"] not in sft_steps():
    raise WorkflowError(f"config selection.end_sft = {config['selection']['end_sft']}: not a saved SFT step "
                        f"(sft.save_steps / sft.max_steps save {sft_steps()})")


def sft_checkpoints():
    return [Checkpoint("sft", step) for step in sft_steps()]


def evaluated_checkpoints():
    """Every model evaluated along SFT: the base (step 0), then each SFT checkpoint."""
    return [Checkpoint("base")] + sft_checkpoints()


def model_dir(ckpt):
    return ckpt.model_dir(RESULTS, base_model_dir())


def checkpoint_model(wildcards):
    """Input function: the model directory of the {ckpt} wildcard."""
    return model_dir(Checkpoint.parse(wildcards.ckpt))


def results_dir(kind, ckpt=None):
    """Per-checkpoint results directory of one kind: of `ckpt`, or a pattern with the {ckpt} wildcard."""
    if ckpt is None:
        return RESULTS_DIR.format(results=RESULTS, kind=kind, name="{ckpt}")
    return ckpt.results_dir(RESULTS, kind)


def all_targets():
    targets = [
        f"{RESULTS}/tables/eval.csv",
        f"{RESULTS}/figs/fig1.pdf",
        f"{RESULTS}/figs/fig2.pdf",
    ]
    if not config["model"]["path"]:
        targets += [f"{RESULTS}/base/abilities.json", f"{RESULTS}/figs/base_abilities.pdf"]
    return targets + spectral_targets() + rl_targets() + restore_targets() + [f"{RESULTS}/SUMMARY.md"]


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


def svd_files(ckpt, shards=None):
    """The SVD cache files of one checkpoint (all shards, or the named ones)."""
    return [f"{results_dir('svd', ckpt)}/{shard}.safetensors" for shard in (shards or svd_shards())]


def svd_embed_shard():
    """The shard holding embed_tokens and lm_head, or None when the selection lacks either."""
    from sftrl.weights.names import matrix_kind

    kinds = {matrix_kind(name) for name in svd_shards().get("embed", [])}
    return "embed" if {"embed_tokens", "lm_head"} <= kinds else None


def resolve(name):
    """A configured checkpoint name -> Checkpoint: base, sft-<step>, or a selection (inter_sft / end_sft) from the
    select_sft checkpoint (raises IncompleteCheckpointException until it has run, which Snakemake handles)."""
    selection = None
    if name in SELECTIONS:
        with checkpoints.select_sft.get().output[0].open() as f:
            selection = json.load(f)
    try:
        ckpt = Checkpoint.resolve(name, selection)
    except ValueError as e:
        raise WorkflowError(f"config spectral.pairs: {e}")
    if ckpt.stage == "sft" and ckpt.step not in sft_steps():
        raise WorkflowError(f"config spectral.pairs: {name} is not a saved SFT step {sft_steps()}")
    return ckpt


def spectral_pair_inputs(wildcards):
    """Model directories and SVD shards of a concrete pair (base / sft-<step>; no selection needed)."""
    inputs = {"code": code("spectral")}
    for role in ("ref", "tgt"):
        ckpt = resolve(getattr(wildcards, role))
        inputs[f"{role}_model"] = model_dir(ckpt)
        inputs[f"{role}_svd"] = svd_files(ckpt)
    return inputs


def spectral_pairs():
    return [tuple(pair) for pair in config["spectral"]["pairs"]]


for _name in {name for pair in spectral_pairs() for name in pair} - set(SELECTIONS):
    try:  # a misspelt name fails now, naming the key, not when the DAG reaches the pair
        Checkpoint.parse(_name)
    except ValueError as e:
        raise WorkflowError(f"config spectral.pairs: {e}")


def spectral_tables_inputs(wildcards):
    """Per-pair tables of every configured pair, in config order (sigma, angles, energy per pair), with the
    names inter_sft / end_sft resolved through the select_sft checkpoint."""
    tables = []
    for ref, tgt in spectral_pairs():
        concrete = [resolve(name).name for name in (ref, tgt)]
        if concrete[0] == concrete[1]:  # e.g. the best OOD checkpoint is the last one: Inter_SFT = End_SFT
            logger.warning(f"config spectral.pairs: {ref} and {tgt} are the same checkpoint ({concrete[0]}) in this "
                           "run; that pair compares a checkpoint with itself (all angles 0)")
        tables += [f"{RESULTS}/spectral/{concrete[0]}/{concrete[1]}/{table}.csv" for table in SPECTRAL_TABLES]
    inputs = {"tables": tables, "code": code("spectral-collect")}
    if {name for pair in spectral_pairs() for name in pair} & set(SELECTIONS):
        inputs["selection"] = checkpoints.select_sft.get().output[0]
    return inputs


def spectral_targets():
    targets = [f"{RESULTS}/tables/spectral_{table}.csv" for table in SPECTRAL_TABLES]
    targets += [f"{RESULTS}/tables/drift.csv", f"{RESULTS}/tables/drift_correlation.json"]
    targets += [f"{RESULTS}/figs/{name}.pdf" for name in ("fig3", "fig4", "fig4_layers", "drift")]
    if svd_embed_shard():
        targets += [f"{RESULTS}/tables/embed_lmhead.csv", f"{RESULTS}/figs/embed_lmhead.pdf"]
    return targets


# -----------------------------------------------------------------------------
# Restoration sweeps (restore.smk): the points of config restore.<sweep>, their B and T, the default targets

RESTORE_FIGURES = {"layer": "fig5", "rank": "fig6", "reverse": "fig7"}


def restore_points(sweep):
    """Point name -> RestoreSpec of one configured sweep (parse time: a bad value fails before any job runs)."""
    try:
        return sweep_points(sweep, config["restore"][sweep])
    except ValueError as e:
        raise WorkflowError(f"config {e}" if str(e).startswith("restore.") else f"config restore.{sweep}: {e}")


for _sweep in SWEEPS:
    restore_points(_sweep)
    for _role in ("reference", "target"):
        _name = config["restore"][_sweep][_role]
        if not needs_selection(_name):
            try:
                Checkpoint.parse(_name)
            except ValueError as e:
                raise WorkflowError(f"config restore.{_sweep}.{_role}: {e}")


def has_rl_rule(name):
    """Whether this workflow has the rule that makes the RL checkpoint `name` (rl_<algo>, issue 13)."""
    algo = name.split("-from-")[0]
    return workflow.is_rule(f"rl_{algo}") or workflow.is_rule("rl")


def restore_sweeps():
    """The sweeps the default target builds: reverse needs its RL checkpoint, so only with the RL rules (issue 13)."""
    return [sweep for sweep in SWEEPS if sweep != "reverse" or has_rl_rule(config["restore"]["reverse"]["target"])]


def restore_resolve(sweep, role):
    """restore.<sweep>.<role> as a concrete checkpoint (selections through the select_sft checkpoint)."""
    name = config["restore"][sweep][role]
    selection = None
    if needs_selection(name):
        with checkpoints.select_sft.get().output[0].open() as f:
            selection = json.load(f)
    try:
        ckpt = Checkpoint.resolve(name, selection)
    except ValueError as e:
        raise WorkflowError(f"config restore.{sweep}.{role}: {e}")
    if ckpt.stage == "sft" and ckpt.step not in sft_steps():
        raise WorkflowError(f"config restore.{sweep}.{role}: {name} is not a saved SFT step {sft_steps()}")
    if ckpt.stage == "rl" and not has_rl_rule(ckpt.name) and not os.path.isdir(model_dir(ckpt)):
        raise WorkflowError(f"config restore.{sweep}.{role} = {name!r}: an RL checkpoint ({model_dir(ckpt)}), but this "
                            "workflow has no rule to make it (rl_<algo>, issue 13) and it does not exist")
    return ckpt


def restore_inputs(wildcards):
    inputs = {"code": code("restore")}
    for role in ("reference", "target"):
        ckpt = restore_resolve(wildcards.sweep, role)
        inputs[role] = model_dir(ckpt)
        inputs[f"{role}_svd"] = svd_files(ckpt)
    return inputs


def restored_model(path):
    return directory(path) if config["restore"]["keep_models"] else temp(directory(path))


def restore_table_inputs(wildcards):
    """Eval summaries of the sweep's points, of its reference and of its target (deduplicated: B = T happens)."""
    sweep = wildcards.sweep
    ckpts = [Checkpoint("restored", 0, f"{sweep}-{point}") for point in restore_points(sweep)]
    ckpts += [restore_resolve(sweep, role) for role in ("reference", "target")]
    summaries = list(dict.fromkeys(f"{results_dir('eval', ckpt)}/{split}.summary.json"
                                   for ckpt in ckpts for split in SPLITS))
    measures = list(dict.fromkeys(f"{results_dir('eval', ckpt)}/rule_reading.json" for ckpt in ckpts))
    inputs = {"summaries": summaries, "measures": measures, "code": code("restore-table")}
    if any(needs_selection(config["restore"][sweep][role]) for role in ("reference", "target")):
        inputs["selection"] = checkpoints.select_sft.get().output[0]
    return inputs


def claims_inputs(wildcards):
    """Every table a claim reads; a function, so the sweeps are known once every rule (rl too) is defined."""
    tables = [f"{RESULTS}/tables/spectral_{table}.csv" for table in ("sigma", "angles")]
    tables += [f"{RESULTS}/tables/restore_{sweep}.csv" for sweep in restore_sweeps()]
    return {"eval_table": f"{RESULTS}/tables/eval.csv", "selection": f"{RESULTS}/sft/selection.json",
            "tables": tables, "code": code("claims")}


def restore_targets():
    sweeps = restore_sweeps()
    return ([f"{RESULTS}/figs/{RESTORE_FIGURES[sweep]}.pdf" for sweep in sweeps]
            + [f"{RESULTS}/tables/restore_{sweep}.csv" for sweep in sweeps] + [f"{RESULTS}/tables/claims.csv"])


def sft_launcher():
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config sft.launcher).
    An argument list, rendered with `:q` in the shell command: each word quoted."""
    if config["sft"]["launcher"] == "accelerate":
        n = config["sft"]["num_processes"]
        return ["accelerate", "launch", "--num_processes", str(n), "-m", "sftrl.cli"]
    return ["sftrl"]


def stem(wildcards, output):
    """Figure stem (path without extension) of a multiext() output pair."""
    return os.path.splitext(output[0])[0]


# -----------------------------------------------------------------------------
# RL (rl.smk): which runs, their knobs and checkpoints, the RL targets. Runs: every algorithm in rl.algorithms from
# every rl.start_from checkpoint, and PPO from every rl.recovery_window step; inter_sft / end_sft resolve through
# the select_sft checkpoint, and a run named twice runs once.



def _check_rl_config():
    from sftrl.config_checks import check_planned_rl_checkpoint
    from sftrl.train.grpo import check_settings as grpo_settings
    from sftrl.train.ppo import check_settings as ppo_settings

    rl = config["rl"]
    for algo in rl["algorithms"] + (["ppo"] if rl["recovery_window"] else []):
        trainer_module = TRAINERS[algo].split(":")[0]
        if importlib.util.find_spec(trainer_module) is None:
            raise WorkflowError(f"config rl.algorithms names {algo}, but {trainer_module} is not in this checkout")
        if algo not in rl:
            raise WorkflowError(f"config rl.algorithms names {algo}, but config rl has no {algo} subsection")
        deepspeed = rl[algo].get("deepspeed")
        if deepspeed and not os.path.isfile(deepspeed):
            raise WorkflowError(f"config rl.{algo}.deepspeed = {deepspeed!r}: no such DeepSpeed JSON file")
    try:
        # the trainers' own checks (batch sizes that divide, ...), before any job rather than when the run starts
        if "ppo" in rl["algorithms"] or rl["recovery_window"]:
            ppo_settings(rl["ppo"], rl)
        if "grpo" in rl["algorithms"]:
            grpo_settings(rl["grpo"])
        updates = {algo: save_updates(rl[algo]["updates"], rl["save_every"]) for algo in ALGORITHMS}
        for sweep in SWEEPS:
            for role in ("reference", "target"):
                check_planned_rl_checkpoint(config["restore"][sweep][role], f"restore.{sweep}.{role}", updates,
                                            sft_steps())
    except ValueError as e:
        raise WorkflowError(str(e) if str(e).startswith("config ") else f"config {e}")
    for name in rl["start_from"]:
        if name not in SELECTIONS and Checkpoint.parse(name).step not in sft_steps():
            raise WorkflowError(f"config rl.start_from: {name} is not a saved SFT step {sft_steps()}")
    for step in rl["recovery_window"]:
        if step not in sft_steps():
            raise WorkflowError(f"config rl.recovery_window: {step} is not a saved SFT step {sft_steps()}")


_check_rl_config()


def eval_table_summaries(wildcards):
    """Base and SFT, then every RL checkpoint (rl.smk; known once select_sft has run when RL starts from a
    selection)."""
    ckpts = evaluated_checkpoints() + rl_checkpoints()
    return [f"{results_dir('eval', ckpt)}/{split}.summary.json" for ckpt in ckpts for split in SPLITS]


def eval_table_measures(wildcards):
    """The rule-reading / NLL report of every checkpoint eval_table_summaries lists."""
    return [f"{results_dir('eval', ckpt)}/rule_reading.json" for ckpt in evaluated_checkpoints() + rl_checkpoints()]


def rl_settings(algo):
    """A run's knobs as one JSON string: config rl without the run plan and the other arms' subsections, so adding a
    start or a recovery step does not rerun the existing runs."""
    return json.dumps(run_settings(config["rl"], algo, config["eval"]["stop_tokens"]), sort_keys=True)


def rl_updates(algo):
    """Updates at which a run of `algo` saves (and which are evaluated)."""
    return save_updates(config["rl"][algo]["updates"], config["rl"]["save_every"])


def rl_named_runs():
    """(algo, start as configured: base, sft-<step>, inter_sft or end_sft) of every configured run, maybe repeated."""
    rl = config["rl"]
    named = [(algo, name) for name in rl["start_from"] for algo in rl["algorithms"]]
    return named + [("ppo", f"sft-{step}") for step in rl["recovery_window"]]


def expected_eval_rows(rl=True):
    """The rows every reader of an evaluation table checks it holds (sftrl.evaluation.table.read_eval_table), as
    JSON: each checkpoint evaluated along SFT and, with `rl`, each saved RL update, times each split. Known at
    parse time: an RL start that is a selection stays as configured (ppo-from-end_sft-u8) and the reader resolves
    it from selection.json."""
    names = [ckpt.name for ckpt in evaluated_checkpoints()]
    if rl:
        names += [f"{algo}-from-{start}-u{u}" for algo, start in rl_named_runs() for u in rl_updates(algo)]
    return json.dumps({"checkpoints": list(dict.fromkeys(names)), "splits": SPLITS})


def rl_runs(ppo_only_window=False):
    """(algo, concrete start Checkpoint) of every configured run, in config order, without repeats. Resolving
    inter_sft / end_sft waits for the select_sft checkpoint. ppo_only_window: only the PPO runs (the window's and
    those from rl.start_from), as the recovery-window figure needs."""
    named = rl_named_runs()
    if ppo_only_window:
        named = [(algo, name) for algo, name in named if algo == "ppo"]
    selection = None
    if any(name in SELECTIONS for _, name in named):
        with checkpoints.select_sft.get().output[0].open() as f:
            selection = json.load(f)
    runs = []
    for algo, name in named:
        run = (algo, Checkpoint.resolve(name, selection))
        if run not in runs:
            runs.append(run)
    return runs


def rl_checkpoints(runs=None):
    """Every evaluated RL checkpoint: each saved update of each run."""
    return [Checkpoint.rl(algo, start, u) for algo, start in (rl_runs() if runs is None else runs)
            for u in rl_updates(algo)]


def rl_launcher(algo):
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config rl.<algo>).
    An argument list, rendered with `:q` in the shell command: a DeepSpeed JSON path is one word, never shell code."""
    arm = config["rl"][algo]
    if arm.get("launcher", "local") != "accelerate":
        return ["sftrl"]
    deepspeed = ["--use_deepspeed", "--deepspeed_config_file", arm["deepspeed"]] if arm.get("deepspeed") else []
    return ["accelerate", "launch", "--num_processes", str(arm["num_processes"]), *deepspeed, "-m", "sftrl.cli"]


def rl_log_inputs(wildcards):
    return [f"{RESULTS}/rl/{algo}-from-{start.name}/log.csv" for algo, start in rl_runs()]


def recovery_window_summaries(wildcards):
    """Only what the figure draws: the summaries of Inter_SFT, End_SFT, every PPO run's start and checkpoints."""
    with checkpoints.select_sft.get().output[0].open() as f:
        selection = json.load(f)
    runs = rl_runs(ppo_only_window=True)
    ckpts = [Checkpoint.resolve(key, selection) for key in SELECTIONS] + [start for _, start in runs]
    ckpts += rl_checkpoints(runs)
    names = list(dict.fromkeys(c.name for c in ckpts))
    return [f"{RESULTS}/eval/{name}/{split}.summary.json" for name in names for split in SPLITS]


def recovery_window_measures(wildcards):
    """The rule-reading reports of the checkpoints whose summaries the recovery-window figure reads."""
    names = dict.fromkeys(os.path.basename(os.path.dirname(p)) for p in recovery_window_summaries(wildcards))
    return [f"{RESULTS}/eval/{name}/rule_reading.json" for name in names]


def rl_targets():
    rl = config["rl"]
    if not (rl["algorithms"] and rl["start_from"]) and not rl["recovery_window"]:
        return []
    targets = [f"{RESULTS}/tables/rl_log.csv", f"{RESULTS}/figs/fig1b.pdf"]
    if rl["recovery_window"] or ("ppo" in rl["algorithms"] and rl["start_from"]):
        targets.append(f"{RESULTS}/figs/recovery_window.pdf")
    return targets


# One set of wildcard constraints for every rule.
wildcard_constraints:
    split="|".join(SPLITS),
    ckpt=NAME_PATTERN,
    # concrete checkpoints only: inter_sft / end_sft are resolved by spectral_tables, so a pair's numbers depend on
    # its two checkpoints alone (a changed selection reuses them)
    ref=NAME_PATTERN,
    tgt=NAME_PATTERN,
    shard="|".join(svd_shards()),
