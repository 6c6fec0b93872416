"""The training run's one typed configuration, `TrainConfig`, and how it is read (file, flags, workflow recipe).

The original IPU flags keep their names; what each becomes here is decided in this module, once,
so the training loop sees only our terms. README.md ("Training flags") has the table.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2ipu.errors import UserError

# Flags that only mean something on an IPU: accepted, and each says what it means here.
IPU_ONLY_FLAGS = {
    "layers_per_ipu": "IPU pipeline placement of layers; here every process holds the whole model",
    "ipus_per_replica": "IPUs spanned by one replica; here a replica is one CPU process or one GPU "
                        "(use --replication-factor for data parallelism)",
    "matmul_proportion": "IPU tile memory reserved for matmuls; no counterpart on CPU/CUDA",
    "device_iterations": "IPU steps run per host call; here every optimizer step is one host "
                         "step (use --gradient-accumulation for the same global batch)",
    "remap_logit": "IPU tile remapping of the logits; here the chunked loss "
                   "(--embedding-serialization-factor) is what keeps the logits small",
}


@dataclass
class TrainConfig:
    # model
    model: str = "gpt2-test"
    max_len: int = 128
    dropout: float = 0.0
    recompute_checkpoint_every_layer: bool = False
    embedding_serialization_factor: int = 1   # vocabulary chunks of the LM-head loss
    enable_sequence_serialized: bool = False  # chunk the loss over tokens instead
    serialized_seq_len: int = 128             # tokens per chunk with --enable-sequence-serialized
    checkpoint_input_dir: str | None = None   # start from a Hugging Face GPT-2 directory
    # data
    dataset: str = "generated"                # generated | tfrecord | mmap
    shards_dir: str | None = None
    vocab_size: int = 50257
    generated_samples: int = 4096
    num_workers: int = 0
    # optimization
    batch_size: int = 4                       # micro-batch per process
    gradient_accumulation: int = 1
    epochs: int = 1
    max_steps: int | None = None              # stop after this many optimizer steps (<= epochs)
    optimizer: str = "AdamW"                  # AdamW | Adam | LAMB
    learning_rate: float = 1.5e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"             # constant | linear | cosine
    lr_warmup: float | None = None            # warmup as a fraction of all steps
    lr_warmup_steps: int | None = None
    grad_clip: float = 1.0                    # 0 disables clipping (the norm is still logged)
    seed: int = 42
    precision: str = "fp32"                   # fp32 | bf16 | fp16
    compile: bool = False
    device: str = "auto"
    # parallelism
    replication_factor: int = 1
    replicated_tensor_sharding: bool = False
    # bookkeeping
    state_dir: str = "train_state"            # checkpoints, metrics.jsonl, tensorboard/
    save_model_path: str | None = None        # the final Hugging Face directory
    resume_training_from_checkpoint: str | None = "auto"  # auto = latest in state_dir, none = fresh
    log_every: int = 1
    eval_every: int = 0                       # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    # IPU-only flags, accepted and explained (see IPU_ONLY_FLAGS)
    layers_per_ipu: list[int] | None = None
    ipus_per_replica: int | None = None
    matmul_proportion: list[float] | None = None
    device_iterations: int | None = None
    remap_logit: bool | None = None
    enable_half_partials: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation * self.replication_factor

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"{source}: unknown training key(s) {unknown}; known keys: {sorted(fields)}")
        return cls(**{key: _typed(key, value, fields[key].type, source) for key, value in values.items()})


def _typed(key: str, value: Any, annotation: str, source: str) -> Any:
    """Check (and, for strings from a command line or `--config`, convert) one training value."""
    base = annotation.split(" ")[0]
    kind = {"int": int, "float": float, "bool": bool}.get(base)
    if kind is None or value is None:
        return value
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if value is None and "None" in annotation:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"{source}: training key '{key}' must be {annotation}, got {value!r}")
    return value


def check_config(cfg: TrainConfig) -> None:
    choices = {"dataset": ("generated", "tfrecord", "mmap"), "optimizer": ("AdamW", "Adam", "LAMB"),
               "lr_schedule": ("constant", "linear", "cosine"), "precision": ("fp32", "bf16", "fp16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"training key '{key}': {getattr(cfg, key)!r} is not one of {list(allowed)}")
    for key in ("batch_size", "gradient_accumulation", "epochs", "max_len", "embedding_serialization_factor"):
        if getattr(cfg, key) < 1:
            raise UserError(f"training key '{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.dataset != "generated" and not cfg.shards_dir:
        raise UserError(f"--dataset {cfg.dataset} needs --shards-dir (the shards stage's output folder)")
    if cfg.lr_warmup is not None and not 0 <= cfg.lr_warmup < 1:
        raise UserError(f"--lr-warmup is a fraction of the steps in [0, 1), got {cfg.lr_warmup}")


def explain_ipu_flags(cfg: TrainConfig, say) -> None:
    for name, meaning in IPU_ONLY_FLAGS.items():
        if getattr(cfg, name) not in (None, False):
            say(f"--{name.replace('_', '-')} {getattr(cfg, name)}: {meaning}; it has no effect here.")
    if cfg.enable_half_partials and cfg.precision == "fp32":
        cfg.precision = "fp16"
        say("--enable-half-partials: half-precision matmul partials become --precision fp16 (autocast "
            "with a grad scaler); use --precision bf16 on GPUs that support it.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON or YAML file of training keys (the flags below override it)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=argparse.SUPPRESS)
        elif f.name in ("layers_per_ipu", "matmul_proportion"):
            parser.add_argument(flag, nargs="+", type=float, default=argparse.SUPPRESS)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                                help=f"(default {default})")
    parser.add_argument("--train-path", dest="dataset", default=argparse.SUPPRESS,
                        help="the original's name for --dataset (dynamic -> generated)")
    parser.add_argument("--pretrained-checkpoint", dest="checkpoint_input_dir", default=argparse.SUPPRESS)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        values.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    if values.get("dataset") == "dynamic":
        values["dataset"] = "generated"
    for key in ("max_steps",):
        if values.get(key) in ("none", "null"):
            values[key] = None
    return TrainConfig.from_dict(values, args.config or "command line")
