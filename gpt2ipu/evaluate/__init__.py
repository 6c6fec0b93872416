"""Evaluation of a GPT-2 checkpoint (any Hugging Face GPT-2 folder) with the published conventions.

- `data`: the evaluation sets, downloaded by URL and checked by sha256, or generated offline in
  the real files' exact formats (the embedded default);
- `wiki`: `evaluate_wiki` (the target of that name): WikiText perplexity (detokenized text, sliding windows; token, word and Megatron's
  adjusted perplexity);
- `lambada`: `evaluate_lambada` (the target of that name): LAMBADA accuracy and target perplexity, `last_word` (strict) and `last_token`;
- `scoring`: the batched teacher-forced scorer both use;
- `results`: the results file, its provenance record from `gpt2ipu.provenance`;
- `cli`: `gpt2ipu evaluate {wiki,lambada,data}`.

See docs/evaluation.md for the definitions.
"""
