"""Text generation from a model folder: the sampling loop (`sampling`), fast CPU decoding (`decode`),
a prompts file -> JSON lines (`batch`, the target `generate`), and `gpt2ipu generate` (`cli`)."""
