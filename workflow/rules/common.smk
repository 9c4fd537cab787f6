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
