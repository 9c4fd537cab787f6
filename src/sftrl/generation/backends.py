"""The three generation backends by name: the one place that imports all of them (the choice is a config value)."""
from __future__ import annotations

from .hf import HFBackend
from .kv import KVBackend
from .vllm import VLLMBackend

BACKENDS = {"hf": HFBackend, "kv": KVBackend, "vllm": VLLMBackend}


def make_backend(name: str, model_dir, model_settings: dict, batch_size: int, **options):
    """`options`: e.g. model= (an already loaded model: hf and kv)."""
    if name not in BACKENDS:
        raise ValueError(f"eval.backend = {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name](model_dir, model_settings, batch_size, **options)
