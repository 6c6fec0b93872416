"""Pretraining: the run's config (`config`), the loop (`loop`), its data order (`data`, `sample_index`),
resumable state (`state`), optimizers (`optim`), parallelism (`parallel`), metrics (`metrics`), the
allocator setting of the `gpt2ipu train` process (`allocator`), the workflow's launcher (`launch`)."""
