"""Parse-time checks of the workflow config that need the model's files or arithmetic the schema cannot express
(issue 25): non-finite numbers, a model directory missing files, stop tokens that are not one token, episodes
that outgrow the context, top_r beyond a matrix's rank, restoration layers / matrices the model lacks, and RL
checkpoints no run saves. Each raises ValueError naming the config key (workflow/rules/common.smk turns it into a
WorkflowError before any job runs). Torch-free: the tokenizer is read with the `tokenizers` library, shapes from
base.architecture or a safetensors header.
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Mapping

from .checkpoint import ALGORITHMS, SELECTIONS, Checkpoint
from .weights.names import layer_index, matrix_kind

# -----------------------------------------------------------------------------
# Numbers


def check_finite_numbers(config: Mapping, key: str = "") -> None:
    """Every number of the config is finite: YAML's .nan / .inf pass every JSON Schema bound (NaN compares false),
    and a NaN learning rate would only show as NaN weights or a torch error inside training."""
    if isinstance(config, Mapping):
        for name, value in config.items():
            check_finite_numbers(value, f"{key}.{name}" if key else str(name))
    elif isinstance(config, list):
        for index, value in enumerate(config):
            check_finite_numbers(value, f"{key}[{index}]")
    elif isinstance(config, float) and not math.isfinite(config):
        raise ValueError(f"config {key} = {config!r}: not a finite number")


# -----------------------------------------------------------------------------
# A real model directory's files

# What AutoTokenizer can load a tokenizer from: a fast tokenizer.json, a SentencePiece model, or BPE vocab + merges.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def missing_model_files(model_dir) -> list[str]:
    """What a Hugging Face causal-LM directory lacks for this workflow (config, safetensors weights and the shards
    its index names, a tokenizer), as readable items; [] when complete."""
    path = Path(model_dir)
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            return missing + [f"a readable model.safetensors.index.json ({e!r})"]
        missing += [shard for shard in shards if not (path / shard).is_file()]
    elif not (path / "model.safetensors").is_file():
        missing.append("weights (model.safetensors or model.safetensors.index.json + shards)")
    if not any(all((path / name).is_file() for name in files) for files in TOKENIZER_FILES):
        missing.append("a tokenizer (" + ", or ".join(" + ".join(files) for files in TOKENIZER_FILES) + ")")
    return missing


def text_config(model_dir) -> dict:
    """config.json of a model directory, the text model's part of it for a multimodal one (Mllama: text_config)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


# -----------------------------------------------------------------------------
# Tokenizer-dependent checks


def load_tokenizer(tokenizer_json):
    """A `tokenizers` Tokenizer from tokenizer.json (no transformers, no torch), or None when there is none."""
    if tokenizer_json is None or not Path(tokenizer_json).is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json))


def check_stop_tokens(tokenizer, stop_tokens, where: str) -> None:
    """Each of eval.stop_tokens must be exactly one token of the vocabulary (as generation.stop_token_ids looks it
    up); a string that is not names how it tokenizes instead."""
    bad = []
    for token in stop_tokens:
        if tokenizer.token_to_id(token) is None:
            pieces = tokenizer.encode(token, add_special_tokens=False).tokens
            bad.append(f"{token!r} (encodes as {len(pieces)} tokens {pieces})")
    if bad:
        raise ValueError(f"config eval.stop_tokens: {', '.join(bad)} are not single tokens of {where} (a stop token "
                         "must be one token of the model's vocabulary)")


def chat_template(model_dir) -> str | None:
    """A model directory's chat template: chat_template.jinja, or the string in tokenizer_config.json; or None."""
    path = Path(model_dir)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "tokenizer_config.json").is_file():
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _render(template: str, messages: list[dict], special: Mapping) -> str:
    """A chat template rendered as transformers renders it (a sandboxed jinja2 environment, trim_blocks,
    lstrip_blocks); jinja2 directly, because transformers' apply_chat_template would import torch at parse time."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


def episode_fixed_tokens(tokenizer, target: int, verify_iter: int, model_dir=None) -> int:
    """Tokens of an episode that are not answers: the prompt (the shortest of any rule), verify_iter - 1 feedback
    turns of an unparseable answer (what a truncated attempt gets; feedback that echoes the answer is longer), the
    chat template around them (the model directory's, when it has one that renders) and the generation prompt."""
    from .task.cards import RULES
    from .task.prompt import render_prompt
    from .task.verifier import feedback_turn, score

    prompt = min((render_prompt(("A", "2", "3", "4"), rule, target) for rule in RULES.values()),
                 key=lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids))
    feedback = feedback_turn(score(None, (1, 2, 3, 4), target))
    messages = [{"role": "user", "content": prompt}]
    for _ in range(verify_iter - 1):
        messages += [{"role": "assistant", "content": ""}, {"role": "user", "content": feedback}]
    template = chat_template(model_dir) if model_dir else None
    text = None
    if template:
        settings = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()) \
            if (Path(model_dir) / "tokenizer_config.json").is_file() else {}
        special = {key: (value or {}).get("content") if isinstance(value, dict) else value
                   for key, value in settings.items() if key.endswith("_token")}
        try:
            text = _render(template, messages, special)
        except Exception:  # a template this plain rendering cannot serve: count the texts alone (still a floor)
            text = None
    texts = [text] if text is not None else [m["content"] for m in messages]
    return sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)


def check_episode_length(verify_iter: int, budgets: Mapping[str, int], context: int, context_key: str,
                         fixed_tokens: int | None = None) -> None:
    """An episode whose attempts use their whole max_new_tokens budget must fit the model's context (positions
    beyond it are untrained: the model would go on silently degraded). budgets: config key -> max_new_tokens;
    fixed_tokens: episode_fixed_tokens, or (no tokenizer at hand) one token per feedback turn."""
    fixed = verify_iter - 1 if fixed_tokens is None else fixed_tokens
    for key, max_new_tokens in budgets.items():
        floor = fixed + verify_iter * max_new_tokens
        if floor > context:
            raise ValueError(
                f"config env.verify_iter = {verify_iter} with {key} = {max_new_tokens}: an episode whose attempts use "
                f"their whole budget reaches at least {floor} tokens ({verify_iter} x {max_new_tokens} answer tokens "
                f"+ {fixed} of prompt, feedback and chat template) > the model's context {context_key} = {context}; "
                f"lower env.verify_iter or {key}")


# -----------------------------------------------------------------------------
# Shapes: top_r, restoration selections


def check_top_r(shapes: Mapping[str, tuple], analysed, top_r: int) -> str | None:
    """spectral.top_r against the ranks (min(m, n)) of the analysed matrices. Beyond every matrix's rank it is an
    error (each top-r subspace would be a whole space: every angle trivially 0). Beyond some, the angles of those
    matrices use r = rank (subspace.spectral_pair_metrics caps it): returned as a warning naming them."""
    ranks = {}
    for name in analysed:
        ranks.setdefault(matrix_kind(name), set()).add(min(shapes[name]))
    largest = max(rank for kind_ranks in ranks.values() for rank in kind_ranks)
    if top_r > largest:
        raise ValueError(f"config spectral.top_r = {top_r} exceeds the rank of every analysed matrix (largest "
                         f"min(m, n) = {largest}): every top-r subspace would be a whole space, all angles 0")
    capped = {kind: min(kind_ranks) for kind, kind_ranks in ranks.items() if min(kind_ranks) < top_r}
    if not capped:
        return None
    listed = ", ".join(f"{kind} ({rank})" for kind, rank in capped.items())
    return (f"config spectral.top_r = {top_r} exceeds the rank of {listed}: their angles use r = rank, so on the "
            "side whose dimension is the rank every angle is trivially 0 (flagged `trivial`, never plotted)")


def check_restore_sweep(sweep: str, points: Mapping, shapes: Mapping[str, tuple], num_layers: int) -> None:
    """Every point of a configured restoration sweep selects matrices of this model (layers within its depth,
    matrix patterns that match), and an integer `top` fits some selected matrix: what sftrl restore checks when
    it runs, checked at parse time (restore.surgery.restore_models)."""
    from .restore.spec import select

    matrices = [name for name, shape in shapes.items() if len(shape) == 2]
    for point, spec in points.items():
        try:
            chosen = select(spec, matrices, num_layers)
        except ValueError as e:
            raise ValueError(f"config restore.{sweep} (point {point}): {e}") from None
        max_rank = max(min(shapes[name]) for name in chosen)
        if isinstance(spec.top, int) and spec.top > max_rank:
            raise ValueError(f"config restore.{sweep}.top = {spec.top}: more than the rank of every selected matrix "
                             f"(<= {max_rank})")


def llama_shapes(architecture: Mapping, vocab_size: int, tie_word_embeddings: bool = False) -> dict[str, tuple]:
    """Parameter name -> shape of the embedded Llama (config base.architecture; vocab_size is the tokenizer's
    upper bound, so the embedding's row count is at most it: ranks min(m, n) are exact while it is >= hidden)."""
    from .weights.names import llama_parameter_names

    h, layers = architecture["hidden_size"], architecture["num_layers"]
    head_dim = h // architecture["num_heads"]
    kv = architecture["num_kv_heads"] * head_dim
    inter = architecture["intermediate_size"]
    by_module = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                 "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
                 "embed_tokens": (vocab_size, h), "lm_head": (vocab_size, h)}
    return {name: by_module.get(matrix_kind(name), (h,))
            for name in llama_parameter_names(layers, tie_word_embeddings)}


def depth(shapes: Mapping[str, tuple]) -> int:
    """Decoder layers of a model, from its parameter names."""
    return 1 + max((index for index in map(layer_index, shapes) if index is not None), default=-1)


# -----------------------------------------------------------------------------
# RL checkpoints named by the config

_RL_NAME = re.compile(rf"^(?P<algo>{'|'.join(ALGORITHMS)})-from-(?P<start>.+)-u(?P<update>\d+)$")


def check_planned_rl_checkpoint(name: str, key: str, saved_updates: Mapping[str, list], sft_steps) -> None:
    """An RL checkpoint named in the config (restore.<sweep>.<role>) must be one its run saves: rule rl_<algo> makes
    the run from any start the DAG asks for, but saves only the updates saved_updates[algo] lists
    (rl.<algo>.updates, rl.save_every: sftrl.checkpoint.save_updates), from a start that exists (a saved SFT step)."""
    match = _RL_NAME.match(name)
    if match is None:
        return
    algo, start, update = match["algo"], match["start"], int(match["update"])
    if start not in SELECTIONS:
        start_ckpt = Checkpoint.parse(start)  # a malformed start fails here, naming it
        if start_ckpt.stage == "sft" and start_ckpt.step not in sft_steps:
            raise ValueError(f"config {key} = {name!r}: its run starts from {start}, not a saved SFT step "
                             f"(sft.save_steps / sft.max_steps save {list(sft_steps)})")
    if update not in saved_updates[algo]:
        raise ValueError(f"config {key} = {name!r}: update {update} is not saved (rl.{algo}.updates and "
                         f"rl.save_every save updates {list(saved_updates[algo])})")


# -----------------------------------------------------------------------------
# Everything that needs the model, at once


def check_with_model(config: Mapping, model_dir=None, tokenizer_dir=None) -> list[str]:
    """The checks above that need the model, for the workflow's config: its shapes from `model_dir` (a real model's
    safetensors header and config.json) or, when None, from base.architecture; its tokenizer from `tokenizer_dir`
    (a real model, or the shipped base; None where none exists yet: a base pretrained here). Raises ValueError
    naming the key; returns warnings to log."""
    from .restore.spec import SWEEPS, sweep_points
    from .weights.names import select_matrices
    from .weights.stored import checkpoint_parameter_shapes, tied_embeddings

    if model_dir is not None:
        shapes = checkpoint_parameter_shapes(model_dir)
        model_config = text_config(model_dir)
        num_layers = model_config.get("num_hidden_layers") or depth(shapes)
        context = model_config.get("max_position_embeddings")
        context_key = f"{model_dir}/config.json max_position_embeddings"
    else:
        arch = config["base"]["architecture"]
        shapes = llama_shapes(arch, config["base"]["vocab_size"])
        num_layers, context = arch["num_layers"], arch["max_position_embeddings"]
        context_key = "base.architecture.max_position_embeddings"
    warnings = []
    spectral = config["spectral"]
    analysed = [name for name in select_matrices(shapes, spectral["include"], spectral["exclude"])
                if len(shapes[name]) == 2]
    if analysed and (warning := check_top_r(shapes, analysed, spectral["top_r"])):
        warnings.append(warning)
    for sweep in SWEEPS:
        section = config["restore"][sweep]
        if model_dir is not None and section.get("lm_head") and not section.get("embed_tokens") \
                and tied_embeddings(model_dir):  # one matrix: restoring it as lm_head would change the input too
            raise ValueError(f"config restore.{sweep}.lm_head: model.path ties lm_head to embed_tokens "
                             "(tie_word_embeddings); set embed_tokens: true to restore the shared matrix, or "
                             "lm_head: false")
        check_restore_sweep(sweep, sweep_points(sweep, section), shapes, num_layers)
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    tokenizer = load_tokenizer(tokenizer_json)
    if tokenizer is not None and config["eval"]["stop_tokens"]:
        check_stop_tokens(tokenizer, config["eval"]["stop_tokens"], str(tokenizer_json))
    if context:
        rl = config["rl"]
        budgets = {"eval.max_new_tokens": config["eval"]["max_new_tokens"]}
        if (rl["algorithms"] and rl["start_from"]) or rl["recovery_window"]:
            budgets["rl.max_new_tokens"] = rl["max_new_tokens"]
        verify_iter = config["env"]["verify_iter"]
        fixed = (episode_fixed_tokens(tokenizer, config["env"]["target"], verify_iter, tokenizer_dir)
                 if tokenizer is not None else None)
        check_episode_length(verify_iter, budgets, context, context_key, fixed)
    return warnings
