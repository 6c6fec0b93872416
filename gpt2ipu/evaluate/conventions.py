"""The evaluation conventions of each task, named once.

The task modules (lambada, wiki, hellaswag), `gpt2ipu evaluate`'s `--conventions`, the report's
evaluation table and `gpt2ipu bench evaluate` take the names from here; config/schema.yaml's
`evaluate.conventions` enums are checked against them by a test (tests/test_evaluate.py).
The definitions are in each task module's docstring and docs/evaluation.md. No imports: the
command's `--help` reads these without loading torch.
"""

# lm-eval's lambada_openai | Megatron-LM's strict last word | the GPT-2 paper's last BPE token
LAMBADA = ("lambada_openai", "last_word", "last_token")
# lm-eval's wikitext (rolling windows per document) | Megatron-LM's (sliding windows over the file)
WIKITEXT = ("lm_eval", "megatron")
# What the lm_eval WikiText convention scores as a document: each article, or the whole file.
WIKITEXT_DOCUMENTS = ("articles", "whole")
# lm-eval's hellaswag | llm.c's and build-nanogpt's
HELLASWAG = ("lm_eval", "llm_c")

BY_TASK = {"lambada": LAMBADA, "wikitext": WIKITEXT, "hellaswag": HELLASWAG}
