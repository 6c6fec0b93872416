"""Evaluation of a GPT-2 checkpoint (any Hugging Face GPT-2 folder) with the published conventions.

- `data`: the evaluation sets, downloaded by URL and checked by sha256, or generated offline in
  the real files' exact formats (the embedded default);
- `wiki`: `evaluate_wiki` (the target of that name): WikiText perplexity, lm-eval's convention
  (per article, rolling windows; word and byte perplexity, bits per byte) and Megatron-LM's
  (sliding windows; token, word and adjusted perplexity);
- `lambada`: `evaluate_lambada` (the target of that name): LAMBADA accuracy and target perplexity,
  `lambada_openai` (lm-eval's), `last_word` (strict) and `last_token`;
- `hellaswag`: `evaluate_hellaswag` (the target of that name): HellaSwag accuracy, lm-eval's
  `hellaswag` (acc, acc_norm) and llm.c's / nanoGPT's (summed and mean ending loss);
- `scoring`: the batched teacher-forced scorer they use (with shared contexts for HellaSwag);
- `results`: the results file, its provenance record from `gpt2ipu.provenance`, and the
  per-sample log (`--log-samples`);
- `cli`: `gpt2ipu evaluate {wiki,lambada,hellaswag,data}`.

See docs/evaluation.md for the definitions.
"""
