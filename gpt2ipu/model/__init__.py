"""GPT-2: the model (`gpt`), its memory-saving autograd pieces (`memory`), the chunked LM-head loss
(`loss`), and the Hugging Face layout in and out (`hf`)."""

from gpt2ipu.model.gpt import GPT, GPTConfig, KVCache, config_for

__all__ = ["GPT", "GPTConfig", "KVCache", "config_for"]
