"""The one vocabulary for the models the study produces and compares: "checkpoints".

A checkpoint is named by its stage and step — `base` (the pretrained model, step 0) and `sft-<step>` (an SFT save)
— and the two SFT checkpoints the paper singles out are *selections*: `inter_sft` (best OOD accuracy) and `end_sft`
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
STAGES = {"base": "Base", "sft": "SFT"}
# Checkpoints chosen from the evaluation table (rule select_sft), by the paper's names.
INTER_SFT, END_SFT = "inter_sft", "end_sft"
SELECTIONS = {INTER_SFT: "Inter_SFT", END_SFT: "End_SFT"}

_NAME = re.compile(r"^(?:(?P<base>base)|(?P<stage>sft)-(?P<step>\d+))$")
# Snakemake wildcard constraint for a concrete checkpoint name (selections are resolved before they reach a path).
NAME_PATTERN = r"base|sft-\d+"
# Where an SFT run exports checkpoint `step` below its export directory (the trainer's own naming).
SFT_EXPORT = "checkpoint-{step}"
# Per-checkpoint results of one kind (eval, svd, ...): `name` is a checkpoint name, or a wildcard in a rule.
RESULTS_DIR = "{results}/{kind}/{name}"


@dataclass(frozen=True)
class Checkpoint:
    stage: str
    step: int = 0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {list(STAGES)}")
        if self.stage == "base" and self.step != 0:
            raise ValueError("the base model has step 0")
        if int(self.step) != self.step or self.step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {self.step!r}")
        object.__setattr__(self, "step", int(self.step))

    @classmethod
    def parse(cls, name: str) -> "Checkpoint":
        """`base` or `sft-<step>`; selections (inter_sft, end_sft) must be resolved first (`resolve`)."""
        match = _NAME.match(str(name))
        if match is None:
            hint = " (a selection: resolve it from selection.json first)" if name in SELECTIONS else ""
            raise ValueError(f"{name!r} is not a checkpoint name: expected base or sft-<step>{hint}")
        return cls("base") if match["base"] else cls(match["stage"], int(match["step"]))

    @classmethod
    def resolve(cls, name: str, selection: dict | None = None) -> "Checkpoint":
        """A configured name: a concrete checkpoint, or a selection looked up in selection.json's content."""
        if name in SELECTIONS:
            if selection is None:
                raise ValueError(f"{name} is a selection: it needs the SFT selection (results/sft/selection.json)")
            return cls("sft", int(selection[name]["step"]))
        return cls.parse(name)

    @property
    def name(self) -> str:
        return "base" if self.stage == "base" else f"{self.stage}-{self.step}"

    def __str__(self) -> str:
        return self.name

    @property
    def sort_key(self) -> tuple:
        return (list(STAGES).index(self.stage), self.step)

    @property
    def label(self) -> str:
        return STAGES[self.stage] if self.stage == "base" else f"{STAGES[self.stage]} step {self.step}"

    def model_dir(self, results: str, base_dir: str) -> str:
        """The Hugging Face directory of this checkpoint (the base's is the embedded or configured model)."""
        if self.stage == "base":
            return str(base_dir)
        return f"{results}/sft/{SFT_EXPORT.format(step=self.step)}"

    def results_dir(self, results: str, kind: str) -> str:
        """Per-checkpoint results of one kind, e.g. `results/eval/sft-40`, `results/svd/base`."""
        return RESULTS_DIR.format(results=results, kind=kind, name=self.name)

    @classmethod
    def from_results_path(cls, path, kind: str) -> "Checkpoint":
        """The checkpoint whose `results_dir(..., kind)` directly holds the file `path` (e.g. an SVD shard)."""
        parts = PurePath(path).parts
        if len(parts) < 3 or parts[-3] != kind:
            raise ValueError(f"{path}: not a file directly inside a {kind}/<checkpoint>/ results directory")
        return cls.parse(parts[-2])

    def to_json(self) -> dict:
        return {"checkpoint": self.name, "stage": self.stage, "step": self.step}


def label(name: str) -> str:
    """Display label of a configured name: a selection's paper name, or the checkpoint's label."""
    return SELECTIONS.get(name) or Checkpoint.parse(name).label


def sort_key(stage: str, step: int) -> tuple:
    """Sort key of table rows carrying `stage` and `step` columns."""
    return Checkpoint(stage, int(step)).sort_key
