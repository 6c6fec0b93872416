"""Benchmarks: `gpt2ipu bench <stage> --json`. Each runs our code and its baselines in the same
process and reports medians of several repeats and the speedup ratios (see `common.report`)."""
