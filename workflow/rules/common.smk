# What every .smk file shares: config validation (parse time: a mistake fails naming the key), params as JSON
# (`settings`), code stamps (`code`, sftrl.codegraph), checkpoint paths and the one resolver of configured checkpoint
# names (`resolve`, sftrl.checkpoint), the default targets. Each stage's plan (input functions, launchers, targets,
# checks of its config section) lives beside its rules (spectral's in spectral_plan.smk). Parse time imports no torch.
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
from sftrl.checkpoint import (ALGORITHMS, NAME_PATTERN, REPLICATE_NAME_PATTERN, RESULTS_DIR, SELECTIONS,  # noqa: E402
                              Checkpoint, needs_selection, save_updates, seed_dir, sft_saved_steps)
from sftrl.cli import command_module  # noqa: E402

RESULTS = "results"
SPLITS = ["id", "ood"]
# The study replicates (config seeds, issue 28): everything a seed changes lives under results/seed-<s>/ (SEEDED, a
# rule pattern with the {seed} wildcard); the data, the base and the base's results are shared by every replicate.
SEEDS = config["seeds"]
SEEDED = seed_dir(RESULTS, "{seed}")
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


def replicate_seed(section, seed):
    """A config section (sft, rl, eval: each has a `seed`) as replicate `seed` runs it: its seed + the replicate's
    seed, so the default replicate 0 runs exactly the configured seeds and replicate s differs in every one of them."""
    return {**section, "seed": section["seed"] + int(seed)}


def seeded_settings(key):
    """Input function: `settings(key)` of the job's replicate ({seed} wildcard); see replicate_seed."""
    return lambda wildcards: json.dumps(replicate_seed(config[key], wildcards.seed), sort_keys=True)


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


def sft_steps():
    """Checkpoint steps SFT writes (sftrl.checkpoint.sft_saved_steps: what HF Trainer saves)."""
    return sft_saved_steps(config["sft"]["max_steps"], config["sft"]["save_steps"])


check_with_model()


if config["selection"]["end_sft"] != "last" and config["selection"]["end_sft"] not in sft_steps():
    raise WorkflowError(f"config selection.end_sft = {config['selection']['end_sft']}: not a saved SFT step "
                        f"(sft.save_steps / sft.max_steps save {sft_steps()})")


def sft_checkpoints():
    return [Checkpoint("sft", step) for step in sft_steps()]


def evaluated_checkpoints():
    """Every model evaluated along SFT: the base (step 0), then each SFT checkpoint."""
    return [Checkpoint("base")] + sft_checkpoints()


def model_dir(ckpt, seed):
    """The model directory of `ckpt` in replicate `seed` (an integer or the "{seed}" wildcard; unused by the base)."""
    return ckpt.model_dir(RESULTS, base_model_dir(), seed)


def checkpoint_model(wildcards):
    """Input function: the model directory of the {ckpt} wildcard (in the {seed} replicate unless it is the base)."""
    return model_dir(Checkpoint.parse(wildcards.ckpt), wildcards.get("seed"))


def results_dir(kind, ckpt=None, seed="{seed}"):
    """Per-checkpoint results directory of one kind: of `ckpt` in replicate `seed`; without `ckpt`, a pattern with
    the {ckpt} wildcard: a replicate's checkpoints (under results/seed-{seed}/), or with seed=None the shared ones
    (the base's, directly under results/)."""
    if ckpt is None:
        return RESULTS_DIR.format(results=RESULTS if seed is None else SEEDED, kind=kind, name="{ckpt}")
    return ckpt.results_dir(RESULTS, kind, seed)


def seeded(path):
    """A replicate's file (path relative to its results/seed-<s>/ folder), as a pattern with the {seed} wildcard."""
    return f"{SEEDED}/{path}"


def each_seed(path):
    """The same replicate file of every configured seed, in config order (the inputs of an across-seed output)."""
    return [f"{seed_dir(RESULTS, seed)}/{path}" for seed in SEEDS]


def selection_file(seed):
    """The select_sft checkpoint's output for replicate `seed`, results/seed-<s>/sft/selection.json (raises
    IncompleteCheckpointException until it has run, which Snakemake handles: it plans what depends on the
    selection once it exists)."""
    return checkpoints.select_sft.get(seed=seed).output[0]


def has_rl_rule(name):
    """Whether this workflow has the rule that makes the RL checkpoint `name` (rl_<algo>, issue 13)."""
    algo = name.split("-from-")[0]
    return workflow.is_rule(f"rl_{algo}") or workflow.is_rule("rl")


def resolve(name, key, seed):
    """The checkpoint name `name` of config `key` as a concrete Checkpoint of replicate `seed`: base, sft-<step>, an
    RL or restored checkpoint, or a selection (inter_sft, end_sft, <algo>-from-<selection>-u<update>) looked up in
    the replicate's selection.json. Fails naming `key` for a name that is not a checkpoint, an SFT step SFT does not
    save, or an RL checkpoint that neither exists nor has a rule to make it. Called by input functions (once every
    rule is defined)."""
    selection = None
    if needs_selection(name):
        with selection_file(seed).open() as f:
            selection = json.load(f)
    try:
        ckpt = Checkpoint.resolve(name, selection)
    except ValueError as e:
        raise WorkflowError(f"config {key}: {e}")
    if ckpt.stage == "sft" and ckpt.step not in sft_steps():
        raise WorkflowError(f"config {key}: {name} is not a saved SFT step {sft_steps()}")
    if ckpt.stage == "rl" and not has_rl_rule(ckpt.name) and not os.path.isdir(model_dir(ckpt, seed)):
        raise WorkflowError(f"config {key} = {name!r}: an RL checkpoint ({model_dir(ckpt, seed)}), but this "
                            "workflow has no rule to make it (rl_<algo>, issue 13) and it does not exist")
    return ckpt


def check_name(name, key):
    """Parse time: the concrete checkpoint name `name` of config `key` must parse (a misspelt one fails now, naming
    the key, not when the DAG reaches it); `resolve` checks the rest once every rule exists."""
    try:
        Checkpoint.parse(name)
    except ValueError as e:
        raise WorkflowError(f"config {key}: {e}")


def stem(wildcards, output):
    """Figure stem (path without extension) of a multiext() output pair."""
    return os.path.splitext(output[0])[0]


# -----------------------------------------------------------------------------
# The RL runs as configured, known at parse time (the rows of the evaluation table; rl.smk plans the runs)


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


def all_targets():
    """The default target's files; each stage's targets come from its plan (called once every .smk is included)."""
    targets = each_seed("tables/eval.csv") + [f"{RESULTS}/figs/fig1.pdf", f"{RESULTS}/figs/fig2.pdf"]
    if not config["model"]["path"]:
        targets += [f"{RESULTS}/base/abilities.json", f"{RESULTS}/figs/base_abilities.pdf"]
    return targets + spectral_targets() + rl_targets() + restore_targets() + [f"{RESULTS}/SUMMARY.md"]


# One set of wildcard constraints for every rule (svd's {shard}, known from the spectral plan, is the svd rule's).
wildcard_constraints:
    split="|".join(SPLITS),
    seed=r"\d+",
    ckpt=NAME_PATTERN,
    # concrete checkpoints only: inter_sft / end_sft are resolved by spectral_tables, so a pair's numbers depend on
    # its two checkpoints alone (a changed selection reuses them)
    ref=NAME_PATTERN,
    tgt=NAME_PATTERN,
