"""`gpt2ipu profile`: a few training steps of a configured run under torch.profiler.

Kept out of gpt2ipu.train on purpose: the training command never imports it, so an unprofiled
run pays nothing for it (no import, no hooks). It builds the run with gpt2ipu.train.loop's own
builders and runs the loop's step, so what it measures is what training does.
"""
