"""Every CUDA path of gpt2ipu checked in one command, each step bounded in time: tools/gpu-check.sh.

No GPU has been lent to this project's development machines for long, so the CUDA code (bf16
training, FSDP and pipeline stages on NCCL, the CUDA memory snapshot of `profile`, generation and
evaluation on the GPU) is checked by this one script whenever a machine with CUDA is at hand:

    tools/gpu-check.sh                  run every step (under 8 minutes), write results/gpu-check.json
    tools/gpu-check.sh --dry-run        list the steps and check every command's flags; runs nothing on a GPU

Each step is one child process with a time limit (`timeout`), so a hung step costs its limit and
no more; the limits add up to STEP_BUDGET_S. The JSON holds the machine (GPU names, memory,
driver, torch and CUDA versions), and per step its command, exit status, seconds, the figures it
printed (the last JSON line of its stdout) and the tail of its messages. The script exits non-zero
when any step failed, and at once, before running anything, on a machine without CUDA.

Steps needing 2 GPUs (DDP/FSDP/pipeline across GPUs) run their 1-GPU smoke form when there is one
GPU: FSDP over a one-process NCCL group; the pipeline, which needs a process per stage and NCCL
refuses two processes on one GPU, is then skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_BUDGET_S = 450   # the steps' time limits add up to at most this: the whole check stays under 8 minutes
GPT2IPU = [sys.executable, "-m", "gpt2ipu"]


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout_s: int
    min_gpus: int = 1
    gpt2ipu_args: list[str] | None = None   # the arguments after `gpt2ipu`, checked by --dry-run
    expect_files: list[str] = field(default_factory=list)   # files the step must leave (relative to out_dir)


def torchrun(nproc: int, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
            "-m", "gpt2ipu", *args]


def steps(out_dir: Path, n_gpus: int) -> list[Step]:
    """The check's steps for a machine with n_gpus CUDA devices."""
    train_small = ["train", "--dataset", "generated", "--model", "gpt2", "--device", "cuda", "--precision", "bf16",
                   "--max-len", "1024", "--batch-size", "8", "--gradient-accumulation", "2", "--max-steps", "6",
                   "--eval-every", "0", "--log-every", "1", "--progress", "false"]
    plan = [
        Step("cuda_tests", "the CUDA-marked tests (pytest -m cuda)",
             [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(REPO / "tests")], 150),
        Step("bench_train_bf16", "GPT-2 small training step in bf16: tokens/s and MFU against the GPU's stated peak",
             [*GPT2IPU, "bench", "train", "--json", "--device", "cuda", "--precision", "bf16", "--preset", "gpt2",
              "--max-len", "1024", "--batch-size", "8", "--steps", "10", "--warmup", "3", "--repeats", "3"], 90),
    ]
    if n_gpus >= 2:
        plan += [
            Step("bench_train_layouts", "DDP, FSDP and 2 pipeline stages over 2 GPUs (NCCL), ratios against DDP",
                 [*GPT2IPU, "bench", "train", "--json", "--device", "cuda", "--precision", "bf16", "--preset", "gpt2",
                  "--nproc", "2", "--layout", "ddp,fsdp,pp", "--steps", "5", "--repeats", "1"], 80, min_gpus=2),
        ]
    else:
        fsdp_args = [*train_small, "--fsdp", "--state-dir", str(out_dir / "fsdp_smoke")]
        plan += [
            Step("fsdp_smoke", "FSDP over a one-process NCCL group on the one GPU (the pipeline needs 2 GPUs: skipped)",
                 torchrun(1, 29555, *fsdp_args), 80, gpt2ipu_args=fsdp_args,
                 expect_files=["fsdp_smoke/metrics.jsonl"]),
        ]
    profile_args = ["profile", "--out-dir", str(out_dir / "profile"), "--model", "gpt2", "--dataset", "generated",
                    "--device", "cuda", "--precision", "bf16", "--max-len", "1024", "--batch-size", "8",
                    "--wait-steps", "1", "--active-steps", "2"]
    plan += [
        Step("profile_memory_snapshot", "profile 2 steps with the CUDA memory snapshot",
             [*GPT2IPU, *profile_args], 60, gpt2ipu_args=profile_args,
             expect_files=["profile/memory_snapshot.pickle", "profile/profile.json"]),
        Step("bench_generate", "batch-1 decoding of GPT-2 small, 128 new tokens, against transformers",
             [*GPT2IPU, "bench", "generate", "--json", "--device", "cuda", "--new-tokens", "128", "--repeats", "3"],
             35),
        Step("bench_evaluate", "LAMBADA scoring (256 passages) against one-at-a-time scoring",
             [*GPT2IPU, "bench", "evaluate", "--json", "--device", "cuda", "--samples", "256", "--repeats", "3"], 35),
    ]
    for step in plan:
        if step.gpt2ipu_args is None and step.argv[:3] == GPT2IPU:
            step.gpt2ipu_args = step.argv[3:]
    return plan


def check_flags(step: Step) -> str | None:
    """The parser's complaint about a step's gpt2ipu arguments, or None: what --dry-run checks."""
    if step.gpt2ipu_args is None:
        return None
    from gpt2ipu.cli import build_parser

    argv = step.gpt2ipu_args
    parser = build_parser(argv[0])   # `bench`'s parser adds its chosen benchmark's flags itself
    try:
        parser.parse_args(argv)
    except SystemExit:
        return f"{step.name}: `gpt2ipu {' '.join(step.gpt2ipu_args)}` does not parse (its message is above)"
    return None


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "gpus": [{"name": torch.cuda.get_device_name(i),
                      "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                     for i in range(torch.cuda.device_count())]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_step(step: Step, out_dir: Path) -> dict:
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout_s, cwd=REPO, env=env)
        rc, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        stdout = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
    missing = [name for name in step.expect_files if not (out_dir / name).exists()]
    passed = rc == 0 and not missing
    return {"name": step.name, "what": step.what, "command": step.argv, "timeout_s": step.timeout_s,
            "exit_status": rc, "passed": passed, "seconds": round(time.monotonic() - start, 1),
            "missing_files": missing, "figures": last_json_line(stdout) if step.argv[-1] != str(REPO / "tests")
            else None, "messages_tail": (stderr + stdout)[-3000:]}


def dry_run(out_dir: Path) -> int:
    """List both plans (1 GPU and 2+) with their limits and check every gpt2ipu command's flags."""
    problems = []
    for n_gpus in (1, 2):
        plan = steps(out_dir, n_gpus)
        total = sum(step.timeout_s for step in plan)
        print(f"# with {n_gpus}{'+' if n_gpus == 2 else ''} GPU(s): {len(plan)} steps, at most {total} s")
        for step in plan:
            print(f"{step.name:<26} <= {step.timeout_s:>3} s  {step.what}\n    {' '.join(step.argv)}")
            problem = check_flags(step)
            if problem:
                problems.append(problem)
        if total > STEP_BUDGET_S:
            problems.append(f"the {n_gpus}-GPU plan's limits add up to {total} s, over the {STEP_BUDGET_S} s budget")
    for problem in problems:
        print(f"gpu-check: dry run: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check their flags; run nothing")
    parser.add_argument("--out", default=str(REPO / "results" / "gpu-check.json"), help="the JSON to write")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out_dir = out.with_suffix("")   # the steps' own files (profile, checkpoints) beside the JSON
    if args.dry_run:
        return dry_run(out_dir)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: FAILED: no CUDA device here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). Run it on a machine with an "
              "NVIDIA GPU and a CUDA build of torch; `tools/gpu-check.sh --dry-run` lists what it would do.",
              file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": []}
    for step in steps(out_dir, torch.cuda.device_count()):
        print(f"gpu-check: {step.name} (at most {step.timeout_s} s): {step.what}", file=sys.stderr, flush=True)
        result = run_step(step, out_dir)
        report["steps"].append(result)
        print(f"gpu-check: {step.name}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s",
              file=sys.stderr, flush=True)
    report["passed"] = all(step["passed"] for step in report["steps"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"gpu-check: {'all steps passed' if report['passed'] else 'FAILED'}; figures in {out}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
