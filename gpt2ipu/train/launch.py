"""How the Snakemake training rule runs `gpt2ipu train`: in process, or under torchrun (elastic.py).

The training state folder is `<state_root>/<run>-<key>`, where the key hashes the recipe and the
shards' stats: the same job rerun after a crash finds its checkpoints and resumes, while a
changed hyperparameter or changed data starts a fresh run instead of resuming a different one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_file
from gpt2ipu.log import package_logger
from gpt2ipu.train.config import workflow_replicas, workflow_run_config
from gpt2ipu.train.elastic import WORKFLOW_FLAGS, Torchrun
from gpt2ipu.train.slurm import launcher

log = package_logger(__name__)


def state_key(recipe: dict[str, Any], shards_dir: str) -> str:
    stats = Path(shards_dir) / "stats.json"
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    if stats.is_file():
        digest.update(stats.read_bytes())
    return digest.hexdigest()[:10]


def pretrain(*, recipe: dict[str, Any], shards_dir: str, state_root: str, run_name: str, model_dir: str,
             metrics_path: str, plot_path: str, threads: int, nproc_per_node: int, nnodes: int,
             rdzv_endpoint: str, parallel: dict[str, Any] | None = None, ops_dir: str | None = None,
             max_restarts: int = 0, rdzv_timeout: float = 600) -> dict[str, Any]:
    parallel = parallel or {"fsdp": False, "pipeline_stages": 1, "layers_per_stage": None, "schedule": "1f1b"}
    world = nproc_per_node * nnodes
    replicas = workflow_replicas(nproc_per_node, nnodes, parallel)
    # The layout is not part of the key: a checkpoint of any layout resumes in any other
    # (gpt2ipu/train/sharded_state.py), so a job rerun with more processes, FSDP or another pipeline
    # split continues the same run.
    state_dir = Path(state_root) / f"{run_name}-{state_key(recipe, shards_dir)}"
    state_dir.mkdir(parents=True, exist_ok=True)
    config = workflow_run_config(recipe, shards_dir=shards_dir, state_dir=str(state_dir), save_model_path=model_dir,
                                 replication_factor=replicas, parallel=parallel)
    config_path = state_dir / "train_config.json"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info(f"training state (checkpoints, metrics): {state_dir}")

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc_per_node))}
    if ops_dir:  # every rank loads the ops the build_ops rule made (none builds or waits for a build)
        from gpt2ipu.ops import OPS_DIR_ENV

        env[OPS_DIR_ENV] = str(Path(ops_dir).resolve())
    train_args = ["--config", str(config_path)]
    # In a SLURM allocation: srun, one torchrun agent per node, meeting on the first node.
    srun, rdzv_endpoint = launcher(os.environ, nproc_per_node=nproc_per_node, nnodes=nnodes,
                                   rdzv_endpoint=rdzv_endpoint)
    if world > 1:
        torchrun = Torchrun(nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                            max_restarts=max_restarts, rdzv_timeout=rdzv_timeout, log_dir=state_dir / "torchrun",
                            flag_names=WORKFLOW_FLAGS, prefix=srun)
        stdout = torchrun.run(train_args, env)
    else:
        # A child process (not an in-process call) so torchrun and the single-process path are the
        # same program, and the thread count is fixed before torch starts.
        result = subprocess.run([sys.executable, "-m", "gpt2ipu", "train", *train_args], env=env, stderr=sys.stderr,
                                stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise UserError(f"training exited with status {result.returncode}; its messages are above. Once "
                            "their cause is fixed (or if it was a crash), rerun the same command: it resumes from "
                            f"the last checkpoint in {state_dir}, if any")
        stdout = result.stdout
    for source, target in ((state_dir / "metrics.jsonl", metrics_path), (state_dir / "loss.png", plot_path)):
        with atomic_file(target) as tmp:
            shutil.copyfile(source, tmp)
    return json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}


