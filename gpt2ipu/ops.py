"""Compiled custom ops (custom_ops/*.cpp): build them, load them, or say why the pure paths are used.

Three ops, registered with PyTorch's dispatcher as `torch.ops.gpt2ipu.*`:

  * `lm_loss`: the fused LM-head cross-entropy and its gradients (`fused_lm_loss` below): tokens in
    blocks of about 128 MB of logits, each row swept through the vocabulary in chunks with an online
    log-sum-exp; never the whole [N, V] logits, and no recompute in backward.
  * `build_sample_idx`: Megatron's sample index (`gpt2ipu.train_data.build_sample_idx` dispatches to it).
  * `decode_linear`: x W^T + b for the few rows decoding feeds, streaming the weights at memory
    speed (`decode_linear` below; `gpt2ipu.generate.use_decode_layout` routes the model's linears to it).

Building and loading are separate on purpose. `build_ops(source_dir, build_dir)` compiles (the
Snakemake rule `build_ops`, or `gpt2ipu ops build --out DIR`) into a folder keyed on the sources and
always leaves a `status.json` there, `{"built": false, "reason": ...}` when there is no compiler or
the build fails. `load_ops()` only loads what is built, from `$GPT2IPU_OPS_DIR` (the training rule
sets it; torchrun ranks inherit it), so no rank ever compiles or waits for another's compile. It
says once per process which path is used and why; every caller falls back to the pure PyTorch /
numpy code, whose results are the same.

This module imports torch only inside functions: the Snakefile imports `build_key` at parse time.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir, write_text_atomic

OPS_DIR_ENV = "GPT2IPU_OPS_DIR"
NAMESPACE = "gpt2ipu"
LIBRARY_NAME = "gpt2ipu_ops"
STATUS_NAME = "status.json"
SOURCE_SUFFIXES = (".cpp", ".h")
# -fopenmp: ATen's parallel_for is an inline OpenMP loop, and `omp simd` vectorizes the row loops.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
BUILD_TIMEOUT_S = 900
DEFAULT_CHUNK_SIZE = 4096  # vocabulary columns per step of a row's online log-sum-exp (16 KB: in L1)
BLOCK_ELEMENTS = 1 << 25  # logits held at once (128 MB in fp32): block_tokens = BLOCK_ELEMENTS // V
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Sources and the build key


def find_source_dir(*candidates: str | os.PathLike | None) -> Path | None:
    """The first of `candidates` that holds C++ sources, else the repository's custom_ops/; None if none does."""
    package_sources = Path(__file__).resolve().parents[1] / "custom_ops"
    for folder in (*[Path(c) for c in candidates if c], package_sources):
        if folder.is_dir() and source_files(folder):
            return folder
    return None


def source_files(source_dir: str | os.PathLike | None) -> list[Path]:
    if source_dir is None:
        return []
    return sorted(p for p in Path(source_dir).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())


def _torch_version() -> str:
    # The installed distribution's version: importing torch would cost seconds at Snakefile parse time.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def build_key(source_dir: str | os.PathLike | None) -> str:
    """Hash of what the library depends on: sources, flags, torch version, machine. 16 hex digits."""
    digest = hashlib.sha256(json.dumps([CFLAGS, LDFLAGS, _torch_version(), platform.machine()]).encode())
    for path in source_files(source_dir):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Build


def read_status(build_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(build_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_ops(source_dir: str | os.PathLike | None, build_dir: str | os.PathLike, *, jobs: int | None = None,
              timeout_s: float = BUILD_TIMEOUT_S, force: bool = False, enabled: bool = True) -> dict[str, Any]:
    """Compile the ops into `build_dir` (atomically) and return its status.json as a dict.

    Never raises for a failed build: the folder is written anyway, with built false and the reason;
    the compiler's output goes to stderr (the rule's log). `jobs` compiler processes at most (default:
    ninja's). A successful build of the same key already in `build_dir` is reused unless `force`.
    `enabled=False` writes a not-built status without compiling (config `ops.build: false`).
    """
    key = build_key(source_dir)
    previous = read_status(build_dir)
    if not force and previous and previous.get("built") and previous.get("key") == key \
            and (Path(build_dir) / previous["library"]).is_file():
        print(f"gpt2ipu ops: reusing the build in {build_dir}", file=sys.stderr)
        return previous
    sources = source_files(source_dir)
    start = time.monotonic()
    with atomic_dir(build_dir) as tmp:
        if not enabled:
            outcome = {"built": False, "reason": "not compiled: switched off (config ops.build: false)"}
        elif not sources:
            outcome = {"built": False, "reason": f"no C++ sources (*.cpp) found in {source_dir}"}
        else:
            outcome = _compile(sources, tmp, timeout_s, jobs)
        status = {"built": False, "reason": None, "library": None, **outcome, "key": key,
                  "torch": _torch_version(), "seconds": round(time.monotonic() - start, 1),
                  "sources": [p.name for p in sources]}
        write_text_atomic(tmp / STATUS_NAME, json.dumps(status, indent=2, sort_keys=True) + "\n")
        from gpt2ipu.provenance import write_provenance

        write_provenance(tmp, "ops", {"cflags": CFLAGS, "ldflags": LDFLAGS, "key": key}, sources,
                         {"built": status["built"], "seconds": status["seconds"]})
    verdict = "built" if status["built"] else f"NOT built ({status['reason']})"
    print(f"gpt2ipu ops: {verdict} in {status['seconds']} s -> {build_dir}", file=sys.stderr)
    return status


def _compile(sources: list[Path], out_dir: Path, timeout_s: float, jobs: int | None) -> dict[str, Any]:
    """Compile and self-check in a child process; {"built": True, "library": name} or the reason why not.

    A child, because loading the library registers its ops in the process for good (a later
    `load_ops` of the final folder would clash), and a crash or hang of the build stays there.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return {"built": False, "reason": f"no C++ compiler: {compiler!r} is not on PATH (set CXX to one)"}
    env = dict(os.environ)
    # ninja from the `ninja` wheel sits beside this Python, which need not be on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if jobs:
        env["MAX_JOBS"] = str(jobs)  # read by torch.utils.cpp_extension: ninja -j
    units = [str(p.resolve()) for p in sources if p.suffix == ".cpp"]  # headers count for the key only
    request = json.dumps({"sources": units, "out_dir": str(out_dir)})
    command = [sys.executable, "-c", "import sys, gpt2ipu.ops as o; o._compile_child(sys.argv[1])", request]
    print(f"gpt2ipu ops: compiling {', '.join(Path(u).name for u in units)} with {compiler} "
          f"(about half a minute on two cores)", file=sys.stderr, flush=True)
    # Streamed line by line into our stderr (the rule's log): a compile has no progress to show
    # with a bar, but its lines appear as they come.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    tail: list[str] = []
    try:
        for line in process.stdout:
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-40:]
        code = process.wait()
    finally:
        timer.cancel()
    result = next((json.loads(line[len("RESULT "):]) for line in reversed(tail) if line.startswith("RESULT ")), None)
    if code == 0 and result:
        return {"built": True, "library": result["library"]}
    if code < 0:
        return {"built": False, "reason": f"the build was stopped after {timeout_s:.0f} s (or killed)"}
    failures = [line for line in tail if line.startswith("self-check failed")] or \
        [line for line in tail if "error" in line.lower()] or tail or ["no output"]
    return {"built": False, "reason": f"compilation failed: {failures[0][:300]} (full compiler output in the log)"}


def _compile_child(request_json: str) -> None:
    request = json.loads(request_json)
    import torch
    from torch.utils import cpp_extension

    path = cpp_extension.load(name=LIBRARY_NAME, sources=request["sources"], build_directory=request["out_dir"],
                              extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), is_python_module=False,
                              verbose=True)
    _self_check(getattr(torch.ops, NAMESPACE))
    print("RESULT " + json.dumps({"library": Path(path).name}), flush=True)


def _self_check(namespace) -> None:
    """The freshly built ops against the pure paths on small inputs: a wrong build is no build."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gpt2ipu.train_data import build_sample_idx_numpy

    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 16, generator=generator), torch.randn(37, 16, generator=generator)
    labels = torch.tensor([0, 5, IGNORE_INDEX, 36, 11, 12, 36])
    loss, _, grad_hidden, grad_weight = namespace.lm_loss(hidden, weight, labels, 8, 3, torch.float32, True, True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX)
    expected.backward()
    if not (torch.allclose(loss, expected, rtol=1e-5) and torch.allclose(grad_hidden, h.grad, atol=1e-6)
            and torch.allclose(grad_weight, w.grad, atol=1e-6)):
        raise SystemExit(f"self-check failed: lm_loss gives {loss.item()}, expected {expected.item()}")
    sizes = np.array([5, 0, 9, 1, 30, 2, 0, 7], dtype=np.int32)
    doc_idx = np.array([3, 1, 0, 7, 4, 6, 2, 5] * 2, dtype=np.int32)
    want = build_sample_idx_numpy(sizes, doc_idx, 4, 2, int(sizes.sum()))
    got = namespace.build_sample_idx(torch.from_numpy(sizes), torch.from_numpy(doc_idx), 4, len(want) - 1).numpy()
    if got.dtype != want.dtype or not np.array_equal(got, want):
        raise SystemExit("self-check failed: build_sample_idx differs from the numpy reference")
    x, weight, bias = torch.randn(3, 24, generator=generator), torch.randn(10, 24, generator=generator), torch.randn(10)
    if not torch.allclose(namespace.decode_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5):
        raise SystemExit("self-check failed: decode_linear differs from F.linear")


def ready_ops_dir(build_dir: str | os.PathLike | None, scratch: str | os.PathLike) -> str:
    """A folder with a good build: `build_dir` or $GPT2IPU_OPS_DIR if given, else a fresh build in `scratch`.

    For the benchmarks, which compare against the compiled ops and so cannot fall back.
    """
    folder = build_dir or os.environ.get(OPS_DIR_ENV)
    if not folder:
        folder = str(Path(scratch) / "ops")
        build_ops(find_source_dir(), folder)
    status = read_status(folder) or {"reason": f"no {STATUS_NAME}"}
    if not status.get("built"):
        raise UserError(f"{folder}: the compiled ops are not built ({status.get('reason')}); "
                        f"build them with `gpt2ipu ops build --out DIR` and pass --ops-dir DIR")
    return str(folder)


# ---------------------------------------------------------------------------------------------
# Load


_lock = threading.Lock()
_outcomes: dict[str, tuple[Any, str]] = {}  # resolved build dir -> (namespace or None, why)
# The folder as given -> its key in _outcomes: resolving a path costs ~10 us (a stat per part),
# and decoding asks once per linear layer per token.
_resolved: dict[tuple[str, str], str] = {}
_loaded_library: Path | None = None


def load_ops(build_dir: str | os.PathLike | None = None, *, quiet: bool = False):
    """`torch.ops.gpt2ipu` with the compiled ops loaded from `build_dir` (default `$GPT2IPU_OPS_DIR`), or None.

    Never builds. The first call for a folder prints, once per process, which path is used and why
    (not configured, not built, build failed, cannot load); later calls answer from memory.
    """
    folder = build_dir if build_dir is not None else os.environ.get(OPS_DIR_ENV) or None
    key = _outcome_key(folder)
    known = _outcomes.get(key)
    if known is not None:
        return known[0]
    with _lock:
        if key not in _outcomes:
            namespace, why = _try_load(Path(folder)) if folder else \
                (None, f"${OPS_DIR_ENV} is not set (build them with `gpt2ipu ops build --out DIR` "
                       f"and point ${OPS_DIR_ENV} at DIR)")
            _outcomes[key] = (namespace, why)
            if not quiet and _announce(namespace is not None):
                path = "compiled ops" if namespace is not None else "pure PyTorch / numpy paths (same results)"
                print(f"gpt2ipu ops: using the {path}: {why}", file=sys.stderr, flush=True)
        return _outcomes[key][0]


def ops_reason(build_dir: str | os.PathLike | None = None) -> str:
    """Why `load_ops(build_dir)` answered what it did (loads first if needed)."""
    load_ops(build_dir, quiet=True)
    folder = build_dir if build_dir is not None else os.environ.get(OPS_DIR_ENV) or None
    return _outcomes[_outcome_key(folder)][1]


def _outcome_key(folder) -> str:
    """The resolved folder (the key of _outcomes), remembered per spelling of the folder."""
    if not folder:
        return ""
    spelling = (str(folder), os.getcwd())   # a relative folder means another one after a chdir
    if spelling not in _resolved:
        _resolved[spelling] = str(Path(folder).resolve())
    return _resolved[spelling]


def _announce(loaded: bool) -> bool:
    # Under torchrun every rank would say the same; rank 0 speaks for a success, any rank for a failure.
    return not loaded or os.environ.get("RANK", "0") == "0"


def _try_load(folder: Path):
    global _loaded_library
    status = read_status(folder)
    if status is None:
        return None, f"not built: no readable {STATUS_NAME} in {folder}"
    if not status.get("built"):
        return None, f"the build in {folder} failed: {status.get('reason')}"
    import torch

    if status.get("torch") != _torch_version():
        return None, (f"{folder} was built for torch {status.get('torch')}, this is torch {_torch_version()}; "
                      f"rebuild it")
    library = (folder / str(status.get("library"))).resolve()
    if _loaded_library is not None and library != _loaded_library:
        loaded = read_status(_loaded_library.parent) or {}
        if loaded.get("key") == status.get("key"):  # same sources, flags and torch: the same code
            return getattr(torch.ops, NAMESPACE), f"loaded from {_loaded_library.parent} (same build as {folder})"
        return None, f"another build of the ops ({_loaded_library.parent}) is already loaded in this process"
    if _loaded_library is None:
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as err:
            return None, f"cannot load {library}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        _loaded_library = library
    return getattr(torch.ops, NAMESPACE), f"loaded from {folder}"


# ---------------------------------------------------------------------------------------------
# The fused LM-head loss


def _compute_dtype(hidden, dtype):
    from gpt2ipu.loss import compute_dtype  # here: gpt2ipu.loss imports this module

    return dtype if dtype is not None else compute_dtype(hidden)


def fused_lm_loss_available(hidden, weight, dtype=None) -> bool:
    """Whether `fused_lm_loss` can take these tensors: ops loaded, CPU tensors, fp32/bf16 compute."""
    import torch

    return (hidden.device.type == "cpu" and weight.device.type == "cpu"
            and _compute_dtype(hidden, dtype) in (torch.float32, torch.bfloat16)
            and load_ops() is not None)


def fused_lm_loss(hidden, weight, labels, *, chunk_size: int = DEFAULT_CHUNK_SIZE, block_tokens: int | None = None,
                  dtype=None, tied=None):
    """(mean cross-entropy over labels != -100, argmax accuracy over them) of `hidden @ weight.T`.

    The contract of `gpt2ipu.loss.chunked_lm_loss` (NaN for both when every label is ignored; the
    gradients are then zero), computed by the compiled op: `block_tokens` tokens at a time (default
    BLOCK_ELEMENTS // V), each token's logits swept `chunk_size` vocabulary entries at a time. With
    gradients wanted, forward computes them (for a loss gradient of 1) and backward scales them:
    nothing is recomputed. hidden [N, d] and weight [V, d] in fp32 or bf16; the matmuls run in `dtype` (default:
    the autocast dtype when autocast is on, else hidden's), the softmax and sums in fp32. Needs the
    ops loaded (see `fused_lm_loss_available`). tied: a `gpt2ipu.loss.TiedGrad` that takes the
    weight's gradient for the embedding lookup to complete.
    """
    import torch

    namespace = load_ops() if _loaded_library is None else getattr(torch.ops, NAMESPACE)
    if namespace is None:
        raise RuntimeError(f"fused_lm_loss needs the compiled ops: {ops_reason()}")
    compute = _compute_dtype(hidden, dtype)
    block = block_tokens or max(1, BLOCK_ELEMENTS // max(1, weight.shape[0]))
    # Decided here: inside Function.forward grad mode is always off.
    grads = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused_function().apply(hidden, weight, labels, int(chunk_size), int(block), compute, *grads, tied)


@functools.cache
def _fused_function():
    """The autograd Function, made on first use so that importing this module does not import torch."""
    import torch

    from gpt2ipu.loss import hand_over  # here: gpt2ipu.loss imports this module

    class FusedLMLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk_size, block_tokens, dtype, hidden_grad, weight_grad, tied):
            loss, accuracy, grad_hidden, grad_weight = getattr(torch.ops, NAMESPACE).lm_loss(
                hidden, weight, labels, chunk_size, block_tokens, dtype, hidden_grad, weight_grad)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.mark_non_differentiable(accuracy)
            ctx.tied = tied
            return loss, accuracy

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss, _grad_accuracy):
            grad_hidden, grad_weight = ctx.saved_tensors
            # In place (the graph frees them after this one backward): a second [V, d] would land
            # on the step's memory peak.
            return (grad_hidden.mul_(grad_loss) if ctx.needs_input_grad[0] else None,
                    hand_over(ctx.tied, grad_weight.mul_(grad_loss)) if ctx.needs_input_grad[1] else None,
                    None, None, None, None, None, None, None)

    return FusedLMLoss


# ---------------------------------------------------------------------------------------------
# The decoding matrix-vector product

DECODE_MAX_ROWS = 16  # custom_ops/decode_linear.cpp's kMaxRows


def decode_linear_available(x, weight) -> bool:
    """Whether `decode_linear(x, weight, bias)` can take this F.linear call (loads the ops if needed)."""
    import torch

    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and x.numel() <= DECODE_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))  # no autograd here
            and load_ops() is not None)


def decode_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for x [..., in] of at most DECODE_MAX_ROWS rows, fp32 CPU, by the compiled op.

    Same values as F.linear up to the order of the sums (a different kernel: the last bits differ).
    """
    rows = x.reshape(-1, x.shape[-1])
    out = load_ops().decode_linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# The sample index


def compiled_sample_idx(sizes, doc_idx, seq_length: int, num_samples: int):
    """The compiled `build_sample_idx` ([num_samples + 1, 2] numpy array), or None without the ops.

    Raises ValueError when doc_idx holds too few tokens, IndexError for a doc_idx entry that is
    not a document, as the numpy reference does.
    """
    namespace = load_ops()
    if namespace is None:
        return None
    import numpy as np
    import torch

    doc_idx = np.asarray(doc_idx)
    if doc_idx.dtype not in (np.int32, np.int64):
        doc_idx = doc_idx.astype(np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    return namespace.build_sample_idx(torch.from_numpy(sizes), torch.from_numpy(np.ascontiguousarray(doc_idx)),
                                      int(seq_length), int(num_samples)).numpy()


# ---------------------------------------------------------------------------------------------
# Command line: gpt2ipu ops build --out DIR | gpt2ipu ops check [DIR]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="ops_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="compile custom_ops/ into DIR (status.json says whether it worked)")
    build.add_argument("--out", required=True, help="build folder (e.g. results/ops/<key>)")
    build.add_argument("--source", default=None, help="folder of the C++ sources (default: the package's custom_ops/)")
    build.add_argument("--force", action="store_true", help="rebuild even if DIR holds a good build of the same key")
    build.add_argument("--strict", action="store_true", help="exit non-zero when the build fails")
    check = actions.add_parser("check", help=f"say whether a build folder (default ${OPS_DIR_ENV}) loads")
    check.add_argument("dir", nargs="?", default=None)


def run(args: argparse.Namespace) -> int:
    if args.ops_action == "build":
        source = Path(args.source) if args.source else find_source_dir()
        if args.source and not (source.is_dir() and source_files(source)):
            raise UserError(f"--source {args.source}: no C++ sources there; give the custom_ops folder")
        status = build_ops(source, args.out, force=args.force)
        print(json.dumps(status, sort_keys=True))
        return 1 if args.strict and not status["built"] else 0
    namespace = load_ops(args.dir, quiet=True)
    print(json.dumps({"loaded": namespace is not None, "reason": ops_reason(args.dir)}))
    return 0 if namespace is not None else 1
