"""What both RL arms (train/ppo.py, train/grpo.py) share: their contract, the hands and sampling of every update,
a run's knobs and save schedule, the work directory's stamp, and the per-update log. (The `sftrl rl` command line
that dispatches to an arm: train/rl_command.py.)

Both arms are called with one signature (`TRAINERS`):

    train_<algo>(start_model_dir, start: Checkpoint, out_dir, work_dir, settings: dict, log_path, threads) -> None

* `settings`: {"rl": config rl (with its ppo / grpo subsection, and eval.stop_tokens as `stop_tokens`), "model":
  config model, "env": config env, "sft_data": config data.sft} — exactly the rule's params, so Snakemake reruns a
  run when any of them changes.
* Checkpoints: `checkpoint-<update>` every `rl.save_every` updates and at the last one (`sftrl.checkpoint.save_updates`), saved
  whole into `work_dir` and exported at once below `out_dir` = the parent of
  `Checkpoint.rl(algo, start, u).model_dir(...)` as a plain model directory with `sftrl_checkpoint.json`
  (train/workdir.py: why two places, export, resume).
* Resume: a rerun continues from the newest checkpoint in `work_dir` made from the same settings, start model and
  code (`prepare_work_dir`); every update draws its hands and sampling seeds from (rl.seed, update), so the resumed
  run equals an uninterrupted one.
* Log: one row per update with LOG_COLUMNS (NaN where a column does not apply to the arm), written to `log_path`
  (CSV) at every checkpoint and at the end; rows of a resumed run's earlier updates are kept in `work_dir`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import codegraph
from ..checkpoint import ALGORITHMS, Checkpoint
from ..generation.sampling import Sampling
from ..io import fingerprint, write_csv
from ..task.cards import ID_RULE, deal
from ..task.data import id_split, multiset_key
from .workdir import stamped_work_dir

# The per-update training log (results/tables/rl_log.csv), in this column order.
LOG_COLUMNS = ["update", "reward", "success_rate", "clip_fraction", "approx_kl", "value_loss",
               "explained_variance", "entropy", "tokens", "seconds"]
# "module:function" of each arm; imported only when chosen (by name: train/rl_command.py).
TRAINERS = {"ppo": "sftrl.train.ppo:train_ppo", "grpo": "sftrl.train.grpo:train_grpo"}


# -----------------------------------------------------------------------------
# What every update draws: hands and sampling, seeded by (seed, update)


def update_seed(seed: int, update: int, process_index: int = 0) -> int:
    """One integer seed per (run seed, update, process): a resumed run draws what an uninterrupted one does."""
    return int(np.random.SeedSequence([seed, update, process_index]).generate_state(1)[0])


def training_problems(settings: dict, update: int, n: int, process_index: int = 0) -> list[dict]:
    """The `n` hands of one update, as evaluation problems (ID rule). rl.multisets = sft_train: only hands whose
    card multiset SFT trained on (the held-out ID-test multisets stay unseen by RL too, and RL adds no new hands
    to SFT's, so a change in OOD accuracy comes from the objective, not from new data); all: any solvable ID hand,
    as the authors' environment deals."""
    rl, target = settings["rl"], settings["env"]["target"]
    rng = np.random.default_rng(update_seed(rl["seed"], update, process_index))
    allowed = None
    if rl["multisets"] == "sft_train":
        allowed = id_split(np.random.default_rng(settings["sft_data"]["seed"]),
                           settings["sft_data"]["id_test_fraction"], target)[0]
    elif rl["multisets"] != "all":
        raise ValueError(f"rl.multisets = {rl['multisets']!r}; expected sft_train or all")
    problems = []
    while len(problems) < n:
        hand = deal(rng, ID_RULE, target)
        if allowed is None or multiset_key(hand.cards) in allowed:
            problems.append({"id": f"rl-u{update}-{len(problems):04d}", "rule": "id", "cards": list(hand.cards),
                             "numbers": list(hand.numbers), "target": target})
    return problems


def rollout_sampling(rl: dict, update: int, process_index: int = 0) -> Sampling:
    """Sampling of one update's rollouts: config rl.temperature / top_p / max_new_tokens and eval.stop_tokens (the
    rules add them to the rl settings as `stop_tokens`: an attempt ends where an evaluated one does), seeded per
    update and process. Never greedy: the policy gradient needs the probabilities the actions were drawn from."""
    if rl["temperature"] <= 0:
        raise ValueError(f"rl.temperature = {rl['temperature']}: RL rollouts must sample (temperature > 0)")
    if "stop_tokens" not in rl:
        raise ValueError("the RL settings lack stop_tokens (config eval.stop_tokens, which workflow/rules/rl.smk "
                         "rl_settings adds to config rl)")
    return Sampling.from_settings(rl, seed=update_seed(rl["seed"], update, process_index))


# the keys of config rl that are not one run's knobs (which runs exist), and the arms' own subsections
RL_PLAN_KEYS = ("start_from", "algorithms", "recovery_window", *ALGORITHMS)


def run_settings(rl: dict, algo: str, stop_tokens) -> dict:
    """One run's knobs: config rl without the run plan and the other arms' subsections (adding a start or a recovery
    step must not rerun the existing runs), with config eval.stop_tokens, so rollouts stop where evaluation stops
    (rollout_sampling)."""
    return {**{k: v for k, v in rl.items() if k not in RL_PLAN_KEYS or k == algo}, "stop_tokens": list(stop_tokens)}


# -----------------------------------------------------------------------------
# The work directory's stamp, the log


def prepare_work_dir(work_dir, settings: dict, start_model_dir, algo: str) -> Path:
    """`work_dir`, emptied unless its state was made from these settings, this start model and this code (this
    module's and the arm's)."""
    made_from = fingerprint({"settings": settings, "start": str(start_model_dir), "algo": algo,
                             "code": codegraph.code_hash([__name__, TRAINERS[algo].split(":")[0]])},
                            *sorted(Path(start_model_dir).glob("*.safetensors")))
    return stamped_work_dir(work_dir, made_from, "settings, start model or code")


def write_log(log_path, rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=LOG_COLUMNS)
    write_csv(log_path, frame)


def collect_logs(paths: list[str], out) -> None:
    """results/tables/rl_log.csv: every run's per-update log, with its run, algorithm and start (from the path
    results/rl/<run>/log.csv, through sftrl.checkpoint)."""
    import pandas as pd

    frames = []
    for path in paths:
        run = Path(path).parent.name
        ckpt = Checkpoint.parse(f"{run}-u0")
        frame = pd.read_csv(path)
        missing = set(LOG_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: not an RL log (missing column(s) {sorted(missing)})")
        frames.append(frame.assign(run=run, algorithm=ckpt.algo, start=ckpt.start.name))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LOG_COLUMNS)
    write_csv(out, table[["run", "algorithm", "start", *LOG_COLUMNS]])


def log_command(parser):
    parser.add_argument("logs", nargs="+", help="results/rl/<run>/log.csv files")
    parser.add_argument("--out", required=True)
    return lambda args: collect_logs(args.logs, args.out)
