"""vLLM offline generation on a GPU with prefix caching; vllm is imported only when this backend is built."""
from __future__ import annotations

from ..modeling import DATE_STRING, load_tokenizer
from .sampling import Sampling, stop_token_ids


class VLLMBackend:
    def __init__(self, model_dir, model_settings: dict, batch_size: int):
        try:
            import vllm  # noqa: F401  (GPU-only dependency: workflow/envs/vllm.yaml)
        except ImportError as err:
            raise RuntimeError("eval.backend = vllm needs the vllm package (workflow/envs/vllm.yaml) and a GPU; "
                               "use eval.backend = hf on CPU") from err
        from vllm import LLM

        from ..modeling import check_finite_files

        self.tokenizer = load_tokenizer(model_dir)
        self.date_string = model_settings.get("date_string", DATE_STRING)  # for chat_prompt (config model)
        check_finite_files(model_dir)
        dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[model_settings["dtype"]]
        # "vllm": ignore the checkpoint's generation_config defaults. Prefix caching reuses the KV blocks of a
        # conversation's earlier rounds (and of the shared rules text) across generate calls, as KVBackend does.
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=0, max_num_seqs=batch_size,
                       generation_config="vllm", enable_prefix_caching=True)

    def generate(self, prompts: list[str], sampling: Sampling, keys=None, keep: bool = True) -> list[str]:
        """`keys` / `keep` are accepted and ignored: vLLM's prefix cache finds the shared blocks by content."""
        return [r.outputs[0].text for r in self._generate(prompts, sampling)]

    def generate_ids(self, prompts: list[str], sampling: Sampling, keys=None, keep: bool = True) -> list[list[int]]:
        return [list(r.outputs[0].token_ids) for r in self._generate(prompts, sampling)]

    def _generate(self, prompts, sampling):
        from vllm import SamplingParams

        # top_k 0 = off and a multiplicative repetition penalty over prompt + output tokens, as transformers'.
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                repetition_penalty=sampling.repetition_penalty,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed,
                                stop_token_ids=stop_token_ids(self.tokenizer, sampling.stop_tokens),
                                skip_special_tokens=True)
        return self.llm.generate(prompts, params, use_tqdm=False)
