import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A base-model config small enough for unit tests (seconds), same keys as config/config.yaml `base`.
MICRO_BASE = {
    "seed": 0,
    "vocab_size": 400,
    "architecture": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 1024},
    "corpus": {"n_documents": 600, "mix": {"arithmetic": 1.0, "target": 1.0, "rule": 0.5, "cards": 1.5},
               "held_out_per_mille": 50},
    "train": {"steps": 12, "batch_size": 4, "seq_len": 64, "lr": 0.003, "min_lr_ratio": 0.1, "warmup_steps": 3,
              "weight_decay": 0.1, "log_every": 2, "save_every": 5},
    "probe": {"n": 4, "seed": 7, "max_new_tokens": 8},
}


@pytest.fixture
def micro_base_settings():
    return copy.deepcopy(MICRO_BASE)


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory):
    """A tiny base model directory built by the real pretraining code."""
    from sftrl.base.pretrain import pretrain

    root = tmp_path_factory.mktemp("base")
    pretrain(MICRO_BASE, root / "model", root / "state", root / "loss.csv")
    return root / "model"



@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """Small SFT data sets (train / loss sets) built by the real data code, shared by the SFT tests."""
    from sftrl.task.data import build_sft_data

    out = tmp_path_factory.mktemp("sft_data")
    build_sft_data({"seed": 0, "n_train": 32, "id_test_fraction": 0.15, "n_id_test": 8, "n_ood_loss": 8,
                    "n_train_loss": 8}, 24, out)
    return out


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A work directory holding one uninterrupted, completed micro run (the reference of several workflow tests)."""
    from helpers import make_workdir, snakemake

    workdir = make_workdir(tmp_path_factory.mktemp("micro"))
    snakemake(workdir, "--cores", "2", "all")
    return workdir
