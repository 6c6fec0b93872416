# Compiled custom ops (custom_ops/*.cpp): one build folder per key, results/ops/<key>, where the key
# hashes the C++ sources, the compiler flags and the torch version (gpt2ipu.ops.build_key, computed
# here at parse time). Editing a source gives a new key: the ops are rebuilt, and the jobs that take
# OPS_DIR as an input rerun; nothing else does. A failed build still completes the job, with
# status.json saying {"built": false, "reason": ...} and the compiler output in the log, so training
# falls back to the pure PyTorch / numpy paths instead of stopping.

from pathlib import Path

import gpt2ipu.ops

OPS_SOURCE_DIR = gpt2ipu.ops.find_source_dir(Path(workflow.basedir) / "custom_ops")
OPS_DIR = f"results/ops/{gpt2ipu.ops.build_key(OPS_SOURCE_DIR)}"


rule build_ops:
    """Compile the fused LM loss and sample-index ops; status.json says whether it worked and why not."""
    input:
        [str(p) for p in gpt2ipu.ops.source_files(OPS_SOURCE_DIR)],
    output:
        directory(OPS_DIR),
    params:
        source_dir=lambda wildcards, input: str(Path(input[0]).parent) if len(input) else "",
        # `ops: {build: false}` in the config skips the compiler (training then uses the pure paths).
        enabled=config.get("ops", {}).get("build", True),
    threads: 2
    log:
        f"logs/ops/build_ops-{Path(OPS_DIR).name}.log",
    benchmark:
        f"benchmarks/build_ops/{Path(OPS_DIR).name}.tsv"
    conda:
        "../../environment.yml"
    script:
        "../scripts/build_ops.py"
