"""The on-disk formats, each read and written in one module: Megatron's mmap dataset, TFRecord shards."""
