"""The one vocabulary for the models the study produces and compares: "checkpoints".

A checkpoint is named by its stage, the run that made it and its step:

| stage | name | run | model directory |
|---|---|---|---|
| `base` | `base` | – | the embedded or configured base model |
| `sft` | `sft-<step>` | – (one SFT run) | `results/seed-<s>/sft/checkpoint-<step>` |
| `rl` | `<algo>-from-<start>-u<update>`, e.g. `ppo-from-sft-160-u8` | `<algo>-from-<start>` (`start`: base or sft-N) | `results/seed-<s>/rl/<run>/checkpoint-<update>` |
| `restored` | `restored-<sweep>-<point>`, e.g. `restored-rank-direction-k0.2` | `<sweep>-<point>` | `results/seed-<s>/restore/<run>` |

Every checkpoint but the base belongs to a study replicate, its *seed* (config `seeds`): its model and its
per-checkpoint results live under the replicate's folder `results/seed-<s>/`. The base is shared by every replicate:
its results (evaluation, SVDs) live directly under `results/`.

The two SFT checkpoints the paper singles out are *selections*: `inter_sft` (best OOD accuracy) and `end_sft`
(the end of SFT), resolved to a concrete `sft-<step>` by the selection rule. This module alone knows that grammar:
how a name is parsed and printed, where a checkpoint's model and per-checkpoint results live, how checkpoints sort
and how figures label them. Rules, tables and figures all go through it, so a new stage (RL runs, restored models)
is added here once.

Torch-free and cheap: Snakemake imports it at parse time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

# Stages in study order (the sort order of every table and figure) and how figures name them.
STAGES = {"base": "Base", "sft": "SFT", "rl": "RL", "restored": "Restored"}
# RL algorithms (sftrl rl --algo) and how figures name them.
ALGORITHMS = {"ppo": "PPO", "grpo": "GRPO"}
# Checkpoints chosen from the evaluation table (rule select_sft), by the paper's names.
INTER_SFT, END_SFT = "inter_sft", "end_sft"
SELECTIONS = {INTER_SFT: "Inter_SFT", END_SFT: "End_SFT"}

_START = r"base|sft-\d+"  # what an RL run may start from (a concrete name)
_SWEEP, _POINT = r"[a-z0-9_]+", r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*"
_NAME = re.compile(
    r"^(?:(?P<base>base)|sft-(?P<sft_step>\d+)"
    rf"|(?P<rl_run>(?P<algo>{'|'.join(ALGORITHMS)})-from-(?P<start>{_START}))-u(?P<rl_step>\d+)"
    rf"|restored-(?P<restored_run>{_SWEEP}-{_POINT}))$"
)
# Snakemake wildcard constraint for a concrete checkpoint name (selections are resolved before they reach a path).
# (named groups become plain ones: Snakemake wraps the pattern in a group of its own).
NAME_PATTERN = re.sub(r"\(\?P<\w+>", "(?:", _NAME.pattern.removeprefix("^(?:").removesuffix(")$"))
# The same for the checkpoints of one study replicate: every one but the shared base.
REPLICATE_NAME_PATTERN = NAME_PATTERN.removeprefix("(?:base)|")
# The folder of a run's checkpoint `step`: in an SFT or RL run's export directory and in its trainer's work
# directory alike (transformers' Trainer names its own folders so: PREFIX_CHECKPOINT_DIR).
CHECKPOINT_FOLDER = "checkpoint-{step}"
_FOLDER = re.compile(CHECKPOINT_FOLDER.format(step=r"(\d+)"))
# Per-checkpoint results of one kind (eval, svd, ...): `name` is a checkpoint name, or a wildcard in a rule.
RESULTS_DIR = "{results}/{kind}/{name}"
# The folder of one study replicate (config `seeds`) inside the results directory: `seed` is an integer, or a
# wildcard in a rule.
SEED_FOLDER = "seed-{seed}"


@dataclass(frozen=True)
class Checkpoint:
    stage: str
    step: int = 0
    # The run of its stage that made it: "" for base and sft (one run each), `<algo>-from-<start>` for rl,
    # `<sweep>-<point>` for restored.
    run: str = ""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {list(STAGES)}")
        if self.stage in ("base", "restored") and self.step != 0:
            raise ValueError(f"a {self.stage} model has step 0")
        if int(self.step) != self.step or self.step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {self.step!r}")
        object.__setattr__(self, "step", int(self.step))
        needs_run = self.stage in ("rl", "restored")
        if needs_run != bool(self.run):
            raise ValueError(f"a {self.stage} checkpoint {'needs' if needs_run else 'has no'} run name, got {self.run!r}")
        if needs_run and _NAME.match(self.name) is None:
            raise ValueError(f"{self.run!r} is not a valid {self.stage} run name (checkpoint {self.name!r})")

    @classmethod
    def parse(cls, name: str) -> "Checkpoint":
        """A concrete name (see the module's table); selections (inter_sft, end_sft) must be resolved first."""
        match = _NAME.match(str(name))
        if match is None:
            hint = " (a selection: resolve it from selection.json first)" if name in SELECTIONS else ""
            raise ValueError(f"{name!r} is not a checkpoint name: expected base, sft-<step>, "
                             f"<algo>-from-<start>-u<update> or restored-<sweep>-<point>{hint}")
        if match["base"]:
            return cls("base")
        if match["sft_step"] is not None:
            return cls("sft", int(match["sft_step"]))
        if match["rl_run"]:
            return cls("rl", int(match["rl_step"]), match["rl_run"])
        return cls("restored", 0, match["restored_run"])

    @classmethod
    def rl(cls, algo: str, start: "Checkpoint | str", update: int) -> "Checkpoint":
        """Update `update` of the `algo` run started from the concrete checkpoint `start`."""
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown RL algorithm {algo!r}; expected one of {list(ALGORITHMS)}")
        start = start if isinstance(start, Checkpoint) else cls.parse(start)
        if start.stage not in ("base", "sft"):
            raise ValueError(f"an RL run starts from base or an SFT checkpoint, not {start.name!r}")
        return cls("rl", update, f"{algo}-from-{start.name}")

    @classmethod
    def resolve(cls, name: str, selection: dict | None = None) -> "Checkpoint":
        """A configured name: a concrete checkpoint, a selection looked up in selection.json's content, or an RL
        checkpoint whose start is a selection (`ppo-from-end_sft-u8`: update 8 of the PPO run from End_SFT)."""
        if needs_selection(name):
            if selection is None:
                what = "is a selection" if name in SELECTIONS else "starts from a selection"
                raise ValueError(f"{name} {what}: it needs the SFT selection (results/seed-<s>/sft/selection.json)")
            if name in SELECTIONS:
                return cls("sft", int(selection[name]["step"]))
            match = _RL_FROM_SELECTION.match(name)
            return cls.rl(match["algo"], cls("sft", int(selection[match["start"]]["step"])), int(match["update"]))
        return cls.parse(name)

    @property
    def name(self) -> str:
        return {"base": "base", "sft": f"sft-{self.step}", "rl": f"{self.run}-u{self.step}",
                "restored": f"restored-{self.run}"}[self.stage]

    def __str__(self) -> str:
        return self.name

    @property
    def algo(self) -> str | None:
        """The RL algorithm of an rl checkpoint (None otherwise)."""
        return self.run.split("-from-")[0] if self.stage == "rl" else None

    @property
    def start(self) -> "Checkpoint | None":
        """The checkpoint an rl run started from (None otherwise)."""
        return Checkpoint.parse(self.run.split("-from-")[1]) if self.stage == "rl" else None

    @property
    def sort_key(self) -> tuple:
        start = self.start.sort_key if self.stage == "rl" else ()
        return (list(STAGES).index(self.stage), start, self.run, self.step)

    @property
    def label(self) -> str:
        if self.stage == "base":
            return STAGES["base"]
        if self.stage == "rl":
            return f"{ALGORITHMS[self.algo]} from {self.start.label}, update {self.step}"
        if self.stage == "restored":
            return f"Restored {self.run}"
        return f"{STAGES[self.stage]} step {self.step}"

    @property
    def seed_dependent(self) -> bool:
        """Whether this checkpoint belongs to one study replicate (every one but the shared base)."""
        return self.stage != "base"

    def _root(self, results: str, seed) -> str:
        if not self.seed_dependent:
            return str(results)
        if seed is None:
            raise ValueError(f"checkpoint {self.name} belongs to a study replicate: its seed is needed")
        return seed_dir(results, seed)

    def model_dir(self, results: str, base_dir: str, seed) -> str:
        """The Hugging Face directory of this checkpoint in replicate `seed` (the base's is the embedded or
        configured model, whatever the seed)."""
        if self.stage == "base":
            return str(base_dir)
        root = self._root(results, seed)
        if self.stage == "rl":
            return f"{root}/rl/{self.run}/{checkpoint_folder(self.step)}"
        if self.stage == "restored":
            return f"{root}/restore/{self.run}"
        return f"{root}/sft/{checkpoint_folder(self.step)}"

    def results_dir(self, results: str, kind: str, seed) -> str:
        """Per-checkpoint results of one kind, e.g. `results/seed-0/eval/sft-40`, `results/svd/base` (the base's
        are shared by every replicate: `seed` is not used)."""
        return RESULTS_DIR.format(results=self._root(results, seed), kind=kind, name=self.name)

    @classmethod
    def from_results_path(cls, path, kind: str) -> "Checkpoint":
        """The checkpoint whose `results_dir(..., kind)` directly holds the file `path` (e.g. an SVD shard)."""
        parts = PurePath(path).parts
        if len(parts) < 3 or parts[-3] != kind:
            raise ValueError(f"{path}: not a file directly inside a {kind}/<checkpoint>/ results directory")
        return cls.parse(parts[-2])

    def to_json(self) -> dict:
        """Table columns: every checkpoint has checkpoint/stage/step; rl adds algorithm and start, restored its sweep
        and point (a table's `run` column is the study run's name, config `run`)."""
        record = {"checkpoint": self.name, "stage": self.stage, "step": self.step}
        if self.stage == "rl":
            record.update(algorithm=self.algo, start=self.start.name)
        if self.stage == "restored":
            sweep, point = self.run.split("-", 1)
            record.update(sweep=sweep, point=point)
        return record


_RL_FROM_SELECTION = re.compile(
    rf"^(?P<algo>{'|'.join(ALGORITHMS)})-from-(?P<start>{'|'.join(SELECTIONS)})-u(?P<update>\d+)$")


def sft_saved_steps(max_steps: int, save_steps: int) -> list[int]:
    """The steps whose checkpoint SFT saves: what transformers' Trainer does with save_strategy="steps"
    (DefaultFlowCallback.on_step_end): every step that is a multiple of `save_steps`, and `max_steps`, where
    training stops (tests/unit/test_checkpoint.py runs that callback)."""
    if max_steps < 1 or save_steps < 1:
        raise ValueError(f"sft.max_steps = {max_steps}, sft.save_steps = {save_steps}: both must be >= 1")
    return _every_and_last(save_steps, max_steps)


def save_updates(updates: int, save_every: int) -> list[int]:
    """Updates after which an RL run saves a checkpoint: every `save_every`, and the last one."""
    if updates < 1 or save_every < 1:
        raise ValueError(f"rl updates = {updates}, rl.save_every = {save_every}: both must be >= 1")
    return _every_and_last(save_every, updates)


def _every_and_last(every: int, last: int) -> list[int]:
    saved = list(range(every, last + 1, every))
    return saved if saved and saved[-1] == last else saved + [last]


def needs_selection(name: str) -> bool:
    """Whether a configured name resolves only through the SFT selection (inter_sft, end_sft, <algo>-from-end_sft-uN)."""
    return name in SELECTIONS or _RL_FROM_SELECTION.match(str(name)) is not None


def label(name: str) -> str:
    """Display label of a configured name: a selection's paper name, or the checkpoint's label."""
    if (match := _RL_FROM_SELECTION.match(str(name))):
        return f"{ALGORITHMS[match['algo']]} from {SELECTIONS[match['start']]}, update {match['update']}"
    return SELECTIONS.get(name) or Checkpoint.parse(name).label


def seed_dir(results: str, seed) -> str:
    """The folder of study replicate `seed` (an integer, or a wildcard such as "{seed}" in a rule)."""
    return f"{results}/{SEED_FOLDER.format(seed=seed)}"


def checkpoint_folder(step: int) -> str:
    """The folder name of a run's checkpoint `step` (CHECKPOINT_FOLDER)."""
    return CHECKPOINT_FOLDER.format(step=int(step))


def folder_step(name: str) -> int | None:
    """The step of a `checkpoint-<step>` folder name; None for any other name (e.g. a save moved aside as
    `checkpoint-6.incomplete-<time>`)."""
    match = _FOLDER.fullmatch(str(name))
    return int(match[1]) if match else None


def sort_key(stage: str, step: int, run: str = "") -> tuple:
    """Sort key of table rows carrying `stage` and `step` (and, for rl / restored rows, `run`) columns."""
    return Checkpoint(stage, int(step), run or "").sort_key
