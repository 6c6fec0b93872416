"""gpt2ipu: a reproducible GPT-2 pretraining pipeline (Wikipedia dump -> shards -> model -> evaluation)."""

__version__ = "0.1.0"
