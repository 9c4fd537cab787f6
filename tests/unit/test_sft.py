"""SFT mechanics on the micro base: checkpoints are exported as plain model dirs, the three loss records exist,
and an interrupted run resumes from its last checkpoint without recomputing it, ending where an uninterrupted
run ends."""
import pytest
import torch
from safetensors.torch import load_file

from sftrl.train import sft

MODEL_SETTINGS = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}
SFT_SETTINGS = {
    "seed": 0, "max_steps": 6, "save_steps": 3, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
    "lr": 0.001, "schedule": "constant_with_warmup", "warmup_steps": 1, "adam_beta1": 0.9, "adam_beta2": 0.98,
    "adam_epsilon": 1e-7, "weight_decay": 0.0, "max_length": 512, "launcher": "local", "num_processes": 1,
    "deepspeed": None, "loss_every": None, "chat_format": "model",
}


def run(micro_base, sft_data, root, settings=SFT_SETTINGS):
    sft.run_sft(micro_base, sft_data, settings, MODEL_SETTINGS, root / "work", root / "export", root / "loss.csv")


def weights(path):
    return load_file(path / "model.safetensors")


def test_sft_exports_checkpoints_and_losses(micro_base, sft_data, tmp_path):
    import pandas as pd

    run(micro_base, sft_data, tmp_path)
    for step in (3, 6):
        exported = tmp_path / "export" / f"checkpoint-{step}"
        assert (exported / "model.safetensors").exists() and (exported / "tokenizer.json").exists()
        assert not (exported / "optimizer.pt").exists()
    # only the newest trainer checkpoint keeps its optimizer state (needed to resume)
    assert not (tmp_path / "work" / "checkpoint-3" / "optimizer.pt").exists()
    assert (tmp_path / "work" / "checkpoint-6" / "optimizer.pt").exists()
    losses = pd.read_csv(tmp_path / "loss.csv")
    for split in ("id_train", "id_test", "ood"):
        assert sorted(losses[losses["split"] == split]["step"]) == [0, 3, 6]  # loss_every null: every save
    assert not torch.equal(weights(tmp_path / "export" / "checkpoint-3")["lm_head.weight"],
                           weights(tmp_path / "export" / "checkpoint-6")["lm_head.weight"])


def test_step0_losses_are_the_starting_models(micro_base, sft_data, tmp_path):
    """The step-0 row is evaluated once training has begun (never before train(): DeepSpeed breaks), but before
    any update: two runs from the same model with different learning rates share it and part at step 3."""
    import pandas as pd

    tables = []
    for lr in (0.001, 0.01):
        root = tmp_path / str(lr)
        run(micro_base, sft_data, root, {**SFT_SETTINGS, "lr": lr, "max_steps": 3})
        tables.append(pd.read_csv(root / "loss.csv").set_index(["step", "split"])["loss"])
    splits = ("id_train", "id_test", "ood")
    assert [tables[0][0, s] for s in splits] == [tables[1][0, s] for s in splits]
    assert all(tables[0][3, s] != tables[1][3, s] for s in splits)


def test_interrupted_sft_resumes_without_recomputing(micro_base, sft_data, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run(micro_base, sft_data, reference)

    real_export = sft.export_checkpoint

    def export_then_die(checkpoint, export_dir):
        real_export(checkpoint, export_dir)
        raise KeyboardInterrupt("simulated interruption after the first checkpoint")

    monkeypatch.setattr(sft, "export_checkpoint", export_then_die)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run(micro_base, sft_data, interrupted)
    first = interrupted / "work" / "checkpoint-3" / "model.safetensors"
    inode, mtime = first.stat().st_ino, first.stat().st_mtime_ns
    monkeypatch.setattr(sft, "export_checkpoint", real_export)
    run(micro_base, sft_data, interrupted)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (inode, mtime)  # not recomputed
    final, expected = weights(interrupted / "export" / "checkpoint-6"), weights(reference / "export" / "checkpoint-6")
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_log_warmup_constant_schedule():
    factor = sft.log_warmup_constant(376)
    assert factor(0) == 0.0
    assert factor(1) == pytest.approx(0.1169, abs=1e-4)  # the authors' log: step 2 -> 1.169e-7 at lr 1e-6
    assert factor(375) == 1.0 and factor(1000) == 1.0


def test_training_prompt_tokens_equal_generation_prompt_tokens(micro_base, sft_data):
    """The prompt part of every training sequence is token for token what generation is given, and only the
    answer (plus the template's end of turn) is supervised."""
    from sftrl.modeling import chat_prompt
    from sftrl.io import read_jsonl
    from sftrl.modeling import load_tokenizer

    tokenizer = load_tokenizer(micro_base)
    for example in read_jsonl(sft_data / "train.jsonl")[:8]:
        tokenized = sft.tokenize_example(tokenizer, example)
        prompt_ids = tokenizer(chat_prompt(tokenizer, example["prompt"]), add_special_tokens=False).input_ids
        n_prompt = tokenized["completion_mask"].index(1)
        assert tokenized["input_ids"][:n_prompt] == prompt_ids
        supervised = tokenizer.decode([t for t, m in zip(tokenized["input_ids"], tokenized["completion_mask"]) if m])
        assert supervised.startswith(example["completion"][0]["content"])
        assert supervised.endswith("<|im_end|>\n")


def test_state_from_other_settings_is_not_resumed(micro_base, sft_data, tmp_path):
    """After a config edit Snakemake reruns SFT to recompute it: trainer state of the old settings is discarded."""
    run(micro_base, sft_data, tmp_path)
    old = weights(tmp_path / "export" / "checkpoint-6")
    run(micro_base, sft_data, tmp_path, settings={**SFT_SETTINGS, "lr": 0.002})
    assert not torch.equal(weights(tmp_path / "export" / "checkpoint-6")["lm_head.weight"], old["lm_head.weight"])


def test_loss_interval_is_independent_of_save_steps(micro_base, sft_data, tmp_path):
    """sft.loss_every: the loss records' cadence (the authors' every 5 steps), checkpoints still every save_steps."""
    import pandas as pd

    run(micro_base, sft_data, tmp_path, settings={**SFT_SETTINGS, "loss_every": 2})
    losses = pd.read_csv(tmp_path / "loss.csv")
    assert sorted(losses[losses["split"] == "ood"]["step"]) == [0, 2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_authors_llama_headers_format(micro_base, sft_data):
    """sft.chat_format = authors_llama_headers: the authors' Qwen SFT text, byte for byte (their data_qwen.py:
    Llama-3 header strings and a literal backslash-n), prompt masked, answer trained."""
    from sftrl.io import read_jsonl
    from sftrl.modeling import load_tokenizer

    example = read_jsonl(sft_data / "train.jsonl")[0]
    prompt, completion = sft.authors_llama_headers(example["prompt"] + example["completion"])
    user, answer = example["prompt"][0]["content"], example["completion"][0]["content"]
    assert prompt == ("<|start_header_id|>user<|end_header_id|>\\n\\n" + user +
                      "<|eot_id|>\\n<|start_header_id|>assistant<|end_header_id|>\\n\\n")
    assert completion == answer + "<|eot_id|>\\n" and "\\n" in completion and not completion.endswith("\n")
    tokenizer = load_tokenizer(micro_base)
    tokenized = sft.tokenize_example(tokenizer, example, "authors_llama_headers")
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert tokenized["completion_mask"] == [0] * n_prompt + [1] * (len(tokenized["input_ids"]) - n_prompt)
    assert tokenizer.decode(tokenized["input_ids"]) == prompt + completion
    with pytest.raises(ValueError, match="sft.chat_format = 'chatml'"):
        sft.tokenize_example(tokenizer, example, "chatml")
