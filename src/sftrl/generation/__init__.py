"""Text generation behind one interface, three backends (`backends.make_backend` picks one by name).

* ``hf``   — transformers ``generate``: batched, left padding, KV cache; runs anywhere (the reference).
* ``kv``   — the same transformers model behind our own decode loop: each episode's KV cache is kept across its
             feedback rounds, the shared prompt prefix is prefilled once, the cache is preallocated and finished
             rows leave the batch (KVBackend; measured numbers in bench/README.md).
* ``vllm`` — ``vllm.LLM`` offline generation on a GPU with prefix caching; imported only when chosen.

All take the same raw prompt strings and the same explicit sampling settings (`Sampling`: temperature, top_p,
top_k, repetition_penalty, stop tokens, max_new_tokens, seed); `keys` name the conversation each prompt continues,
for the backends that reuse its cache. Nothing is taken implicitly from a checkpoint's generation_config.json: the
authors' eval inherited do_sample/top_p/top_k/repetition_penalty from each checkpoint (authors_code_spec.md §8 item
18); we do not (the paper configs write their effective values out instead).

One sampling pipeline, transformers' own: repetition penalty (also when greedy), then temperature, top-k, top-p
(`logits_processors`, the classes and order of `GenerationMixin._get_logits_processor`), then argmax or a
multinomial draw. The repetition penalty sees the conversation's tokens: the whole rendered prompt (every earlier
turn, as re-tokenized from the chat template) plus what this attempt generated so far, never the batch's padding.
"""
# Imports nothing: a module that needs only `sampling` must not run (nor depend on the code of) every backend.
