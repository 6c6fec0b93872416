"""Pretraining: the run's config (`config`), the loop (`loop`), its data order (`data`, `sample_index`),
resumable state (`state`), optimizers (`optim`), parallelism (`parallel`), metrics (`metrics`), the
workflow's launcher (`launch`); the `gpt2ipu train` process's malloc settings are gpt2ipu/allocator.py."""
