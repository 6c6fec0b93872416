"""The training run's one typed configuration, `TrainConfig`, how it is read (file, flags, workflow
recipe), and `resolve`: the one place the original IPU flags are translated into our terms.

The original's flags keep their names so its command lines and recipes still parse. `resolve`
checks a config and turns those flags into what this implementation does with them (a precision,
a way of chunking the loss, notes for the IPU-only flags), so the training loop reads only our
terms. README.md ("Training flags") has the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2ipu.devices import PRECISIONS
from gpt2ipu.errors import UserError
from gpt2ipu.sizes import PRESETS, SIZE_KEYS, ModelSize, model_size

# Flags that only mean something on an IPU: accepted, and each says what it means here.
IPU_ONLY_FLAGS = {
    "matmul_proportion": "IPU tile memory reserved for matmuls; no counterpart on CPU/CUDA",
    "device_iterations": "IPU steps run per host call; here every optimizer step is one host "
                         "step (use --gradient-accumulation for the same global batch)",
    "remap_logit": "IPU tile remapping of the logits; here the chunked loss "
                   "(--embedding-serialization-factor) is what keeps the logits small",
}


def _flag(default: Any, help_text: str) -> Any:
    """A TrainConfig field whose `gpt2ipu train --help` line is `help_text` (what the setting does)."""
    return field(default=default, metadata={"help": help_text})


def _ipu_only(name: str) -> Any:
    return _flag(None, f"the original's IPU-only flag: {IPU_ONLY_FLAGS[name]}. Accepted; it has no effect "
                       "here, and the run says so")


@dataclass
class TrainConfig:
    """Everything one training run is given: one field per `gpt2ipu train` flag and `--config` key.

    Why one dataclass: the command line, a `--config` file and the Snakemake recipe
    (gpt2ipu.train.launch) all become this one typed value, checked the same way, and a copy is
    saved with every checkpoint (train_config.json) as the record of the run. Field names are the
    original IPU implementation's flag names where one exists, so its command lines still parse;
    `resolve` says what those flags become here. Each field's `help` metadata is its flag's help.
    """

    # model
    model: str = _flag("gpt2-test", "GPT-2 size preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl (12/24/36/48 layers) "
                                    "or gpt2-test (tiny, for tests); the original's --model")
    n_layer: int | None = _flag(None, "transformer layers, in place of the --model preset's (e.g. --n-layer 6 "
                                      "--n-embd 384 --n-head 6: nanoGPT's baby GPT); none = the preset's")
    n_embd: int | None = _flag(None, "width of the residual stream, in place of the --model preset's; a multiple "
                                     "of --n-head; none = the preset's")
    n_head: int | None = _flag(None, "attention heads, in place of the --model preset's; none = the preset's")
    n_positions: int | None = _flag(None, "position embeddings (the longest sequence the model takes), at least "
                                          "--max-len; none = --max-len")
    max_len: int = _flag(128, "tokens per training sample (the context length); the original's --max-len")
    dropout: float = _flag(0.0, "dropout probability of the embeddings, attention and residual paths (0 = none)")
    recompute_checkpoint_every_layer: bool = _flag(
        False, "recompute each transformer block's activations in the backward pass instead of keeping them "
               "(activation checkpointing: less memory, more compute); the original's flag of the same name")
    embedding_serialization_factor: int = _flag(
        1, "compute the LM-head loss in N vocabulary chunks, so the full logits tensor is never held; "
           "the original's flag of the same name (there: the embedding split into N serial IPU passes)")
    enable_sequence_serialized: bool = _flag(
        False, "chunk the LM-head loss over the tokens (chunks of --serialized-seq-len) instead of over the "
               "vocabulary (--embedding-serialization-factor is then not used); the original's flag of the same name")
    serialized_seq_len: int = _flag(128, "tokens per loss chunk with --enable-sequence-serialized; "
                                         "the original's flag of the same name")
    checkpoint_input_dir: str | None = _flag(
        None, "start from the weights in this Hugging Face GPT-2 directory (ours, or one saved by transformers) "
              "instead of a fresh initialization; the original's --pretrained-checkpoint")
    # data
    dataset: str = _flag("generated", "where training samples come from: generated (random tokens, the original's "
                                      "mock data), tfrecord (the shards' TFRecord files) or mmap (Megatron-style "
                                      "document sampling over the shards' mmap files); the original's --train-path")
    shards_dir: str | None = _flag(None, "the shards stage's output folder; needed by --dataset tfrecord and mmap")
    vocab_size: int = _flag(50257, "vocabulary size of the model (and the token range of --dataset generated)")
    generated_samples: int = _flag(4096, "training samples in --dataset generated")
    num_workers: int = _flag(0, "DataLoader worker processes reading samples (0 = read in the training process)")
    # optimization
    batch_size: int = _flag(4, "micro-batch: samples per process in one forward/backward pass; "
                               "the original's --batch-size")
    gradient_accumulation: int = _flag(1, "micro-batches whose gradients are summed into one optimizer step (the "
                                          "global batch is batch size x this x processes); the original's flag "
                                          "of the same name")
    epochs: int = _flag(1, "passes over the training data; the original's --epochs")
    max_steps: int | None = _flag(None, "stop after this many optimizer steps even if the epochs are not done "
                                        "(none = no cap)")
    optimizer: str = _flag("AdamW", "AdamW, Adam or LAMB; the original's --optimizer")
    learning_rate: float = _flag(1.5e-4, "peak learning rate, reached after the warmup; the original's "
                                         "--learning-rate")
    weight_decay: float = _flag(0.0, "weight decay of the weight matrices (never of biases or LayerNorm); "
                                     "the original's --weight-decay")
    adam_beta1: float = _flag(0.9, "beta1 of Adam, AdamW and LAMB (decay of the gradient's running mean)")
    adam_beta2: float = _flag(0.999, "beta2 of Adam, AdamW and LAMB (decay of the squared gradient's running mean)")
    adam_eps: float = _flag(1e-8, "epsilon of Adam, AdamW and LAMB (added to the denominator)")
    lr_schedule: str = _flag("constant", "learning-rate schedule after the warmup: constant, linear or cosine "
                                         "(decay to 0 at the last step); the original's --lr-schedule")
    lr_warmup: float | None = _flag(None, "linear warmup from 0, as a fraction of all steps, in [0, 1); "
                                          "the original's --lr-warmup")
    lr_warmup_steps: int | None = _flag(None, "linear warmup from 0, in optimizer steps (takes precedence over "
                                              "--lr-warmup); the original's --lr-warmup-steps")
    grad_clip: float = _flag(1.0, "clip the gradients' global norm to this (0 = no clipping; the norm is logged "
                                  "either way)")
    seed: int = _flag(42, "seed of the initialization, dropout and the data order")
    precision: str = _flag("fp32", "fp32, bf16 or fp16: bf16 and fp16 run the matmuls under autocast (fp16 with a "
                                   "grad scaler), the weights and optimizer stay fp32")
    compile: bool = _flag(False, "run the model through torch.compile (with --fsdp or pipeline stages: "
                                   "each transformer block, before it is sharded or staged)")
    device: str = _flag("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    # parallelism
    replication_factor: int = _flag(1, "data-parallel processes (DDP); must equal the number torchrun launched; "
                                       "the original's --replication-factor")
    replicated_tensor_sharding: bool = _flag(
        False, "shard the optimizer state over the data-parallel processes (ZeRO-1, ZeroRedundancyOptimizer); "
               "the original's flag of the same name")
    fsdp: bool = _flag(False, "shard parameters, gradients and optimizer state over the data-parallel processes "
                              "(FSDP2 fully_shard per transformer block), instead of DDP's full copies")
    pipeline_stages: int = _flag(1, "pipeline stages, one process each (torch.distributed.pipelining); the layers "
                                    "are split evenly unless --layers-per-ipu gives the split; processes = stages x "
                                    "--replication-factor")
    pipeline_schedule: str = _flag("1f1b", "pipeline schedule: 1f1b (one forward, one backward: activations of at "
                                           "most `stages` micro-batches kept) or gpipe (all forwards, then all "
                                           "backwards); the micro-batches are --gradient-accumulation's")
    layers_per_ipu: list[int] | None = _flag(
        None, "transformer layers of each pipeline stage, e.g. 3 3 3 3 (-1: an even share of the rest); sets "
              "--pipeline-stages to their number; the original's flag of the same name")
    ipus_per_replica: int | None = _flag(
        None, "the original's IPUs per replica: here the pipeline stages (processes) per replica, as "
              "--pipeline-stages")
    # bookkeeping
    state_dir: str = _flag("train_state", "folder of the run's checkpoints, metrics.jsonl, loss.png and "
                                          "tensorboard/; a rerun with the same folder resumes")
    save_model_path: str | None = _flag(None, "after the last step, write the weights to this Hugging Face GPT-2 "
                                              "directory; the original's --save-model-path")
    resume_training_from_checkpoint: str | None = _flag(
        "auto", "auto: resume from the latest checkpoint in --state-dir if there is one; none: start fresh; "
                "or a checkpoint folder to resume from; the original's flag of the same name")
    log_every: int = _flag(1, "write a metrics line every N steps (steps with a validation loss and the last "
                              "step are always written)")
    eval_every: int = _flag(0, "compute the validation loss every N steps (0 = only after the last step)")
    eval_batches: int = _flag(8, "validation micro-batches per evaluation")
    checkpoint_every: int = _flag(50, "save a resumable checkpoint every N steps (0 = only after the last step)")
    final_checkpoint: bool = _flag(True, "save a resumable checkpoint after the last step (false: for benchmarks and "
                                         "throwaway runs; a sharded run with --save-model-path saves it anyway, "
                                         "since its model is consolidated from it)")
    keep_checkpoints: int = _flag(2, "checkpoints kept in --state-dir, the newest, at least 2 (the newest is good "
                                     "only once its next step ran finite); older ones are deleted (0 = keep all)")
    progress: bool = _flag(True, "show a progress bar on stderr")
    # the original's IPU-only flags, accepted and explained (see IPU_ONLY_FLAGS)
    matmul_proportion: list[float] | None = _ipu_only("matmul_proportion")
    device_iterations: int | None = _ipu_only("device_iterations")
    remap_logit: bool | None = _ipu_only("remap_logit")
    enable_half_partials: bool = _flag(False, "the original's half-precision matmul partials: here it makes "
                                              "--precision fp32 into fp16 (autocast with a grad scaler)")
    # Free-form keys a recipe may carry along; saved in train_config.json, not read by training (not a flag).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all replicas: micro-batch x accumulation x replicas."""
        return self.batch_size * self.gradient_accumulation * self.replication_factor

    def model_size(self) -> ModelSize:
        """The size of the model a fresh run builds: --model's preset with --n-layer, --n-embd, --n-head,
        --n-positions in place of its own; a UserError lists what cannot be built."""
        return model_size(self.model, self.max_len, **{key: getattr(self, key) for key in SIZE_KEYS})

    @property
    def stages(self) -> int:
        """Pipeline stages per replica: --layers-per-ipu's count, else --ipus-per-replica or --pipeline-stages."""
        if self.layers_per_ipu:
            return len(self.layers_per_ipu)
        return self.ipus_per_replica or self.pipeline_stages

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> TrainConfig:
        """A config from `--config`/flag values (strings are converted); unknown keys name `source`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            hints = "; ".join(f"did you mean {' or '.join(repr(m) for m in close)} for {key!r}?"
                              for key in unknown if (close := difflib.get_close_matches(key, fields, n=3)))
            raise UserError(f"{source}: unknown training key(s) {unknown}; "
                            f"{hints + ' ' if hints else ''}known keys: {sorted(fields)}")
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
    """Refuse values training cannot run with, naming the key, before anything is built."""
    choices = {"dataset": ("generated", "tfrecord", "mmap"), "optimizer": ("AdamW", "Adam", "LAMB"),
               "lr_schedule": ("constant", "linear", "cosine"), "precision": PRECISIONS}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"training key '{key}': {getattr(cfg, key)!r} is not one of {list(allowed)}")
    for key in ("batch_size", "gradient_accumulation", "epochs", "max_len", "embedding_serialization_factor"):
        if getattr(cfg, key) < 1:
            raise UserError(f"training key '{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.enable_sequence_serialized and cfg.serialized_seq_len < 1:
        raise UserError(f"training key 'serialized_seq_len' must be at least 1, got {cfg.serialized_seq_len}")
    if cfg.dataset != "generated" and not cfg.shards_dir:
        raise UserError(f"--dataset {cfg.dataset} needs --shards-dir (the shards stage's output folder)")
    if cfg.lr_warmup is not None and not 0 <= cfg.lr_warmup < 1:
        raise UserError(f"--lr-warmup is a fraction of the steps in [0, 1), got {cfg.lr_warmup}")
    if cfg.pipeline_schedule not in ("1f1b", "gpipe"):
        raise UserError(f"training key 'pipeline_schedule': {cfg.pipeline_schedule!r} is not one of ['1f1b', 'gpipe']")
    sizes_given = [f"--{key.replace('_', '-')}" for key in SIZE_KEYS if getattr(cfg, key) is not None]
    if cfg.checkpoint_input_dir and sizes_given:
        raise UserError(f"{', '.join(sizes_given)} set the size of a fresh model, but --checkpoint-input-dir "
                        f"{cfg.checkpoint_input_dir} brings its own (its config.json): drop {', '.join(sizes_given)}")
    if not cfg.checkpoint_input_dir:
        cfg.model_size()


def check_layout(cfg: TrainConfig, world_size: int, n_layer: int | None) -> list[int] | None:
    """Refuse, before any process builds the model, a parallel layout that cannot run; the layers of
    each pipeline stage (None without stages).

    world_size: the processes torchrun launched; n_layer: the model's transformer layers (None: not
    known yet, as when the workflow starts; the split is then left to `check_stage_split`).
    """
    stages, replicas = cfg.stages, cfg.replication_factor
    if stages < 1 or replicas < 1:
        raise UserError(f"--pipeline-stages ({stages}) and --replication-factor ({replicas}) must be at least 1")
    if cfg.layers_per_ipu and cfg.ipus_per_replica and cfg.ipus_per_replica != len(cfg.layers_per_ipu):
        raise UserError(f"--ipus-per-replica {cfg.ipus_per_replica} but --layers-per-ipu names "
                        f"{len(cfg.layers_per_ipu)} stages: give one layer count per stage")
    if n_layer is not None and stages > n_layer:
        raise UserError(f"{stages} pipeline stages for a model of {n_layer} layers: use at most {n_layer} stages")
    sizes = None
    if n_layer is not None and stages > 1:
        sizes = [len(r) for r in stage_layers(n_layer, stages, cfg.layers_per_ipu)]
    if cfg.fsdp and cfg.replicated_tensor_sharding:
        raise UserError("--fsdp and --replicated-tensor-sharding both shard the optimizer state: choose one "
                        "(--fsdp also shards parameters and gradients)")
    if stages > 1 and cfg.replicated_tensor_sharding:
        raise UserError("--replicated-tensor-sharding (ZeRO-1) does not run with pipeline stages: use --fsdp to "
                        "shard each stage over the replicas")
    if (cfg.fsdp or stages > 1) and cfg.precision == "fp16":
        raise UserError("--precision fp16 needs a loss scaler, which runs only without --fsdp and pipeline stages: "
                        "use --precision bf16 (or fp32)")
    if stages * replicas != world_size:
        what = (f"{stages} pipeline stage(s) x {replicas} replica(s) (--replication-factor) = {stages * replicas} "
                if stages > 1 else f"--replication-factor {replicas}: {replicas} ")
        raise UserError(f"{what}process(es) are needed, but {world_size} were launched: start the run with "
                        f"`torchrun --nproc_per_node {stages * replicas} -m gpt2ipu train ...` (the Snakemake "
                        "rule does this from train.nproc_per_node / train.nnodes)")
    return sizes


def stage_layers(n_layer: int, stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """The blocks each stage runs: `layers_per_stage` (the original's --layers-per-ipu; -1 entries
    share what the others leave), or an even split with the remainder on the first stages."""
    if layers_per_stage is None:
        base, extra = divmod(n_layer, stages)
        counts = [base + (i < extra) for i in range(stages)]
    else:
        counts = [int(n) for n in layers_per_stage]
        auto = [i for i, n in enumerate(counts) if n == -1]
        if len(counts) != stages or any(n < -1 for n in counts):
            raise UserError(f"--layers-per-ipu {layers_per_stage}: give one layer count (>= 0, or -1 for an even "
                            f"share of the rest) per pipeline stage, {stages} stage(s)")
        left = n_layer - sum(n for n in counts if n >= 0)
        if auto and left >= 0:
            for j, i in enumerate(auto):
                counts[i] = left // len(auto) + (j < left % len(auto))
        if sum(counts) != n_layer:
            raise UserError(f"--layers-per-ipu {layers_per_stage} places {sum(counts)} layers, but the model has "
                            f"{n_layer}: make the counts add up to {n_layer}")
    starts = [sum(counts[:i]) for i in range(stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def workflow_run_config(recipe: dict[str, Any], *, shards_dir: str, state_dir: str, save_model_path: str,
                        replication_factor: int, parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """A workflow recipe's training keys as the pretrain job runs them: the keys the job sets
    itself (data, state, output, processes, and the layout of config key `train.parallel`) replace
    the recipe's own."""
    layout = {}
    if parallel:
        layout = {"fsdp": parallel["fsdp"], "pipeline_stages": parallel["pipeline_stages"],
                  "layers_per_ipu": parallel["layers_per_stage"], "pipeline_schedule": parallel["schedule"]}
    return {**recipe, "shards_dir": shards_dir, "state_dir": state_dir, "save_model_path": save_model_path,
            "replication_factor": replication_factor, "resume_training_from_checkpoint": "auto", **layout}


def workflow_replicas(nproc_per_node: int, nnodes: int, parallel: dict[str, Any]) -> int:
    """Replicas of the pipeline (--replication-factor) the workflow's processes make, or a UserError."""
    world, stages = nproc_per_node * nnodes, len(parallel["layers_per_stage"] or []) or parallel["pipeline_stages"]
    if world % stages:
        raise UserError(f"config key 'train.parallel': {stages} pipeline stages do not divide the {world} processes "
                        f"of train.nproc_per_node x train.nnodes ({nproc_per_node} x {nnodes}); make the processes a "
                        "multiple of the stages")
    return world // stages


def check_recipes(recipes: dict[str, Any], train_settings: dict[str, Any] | None = None) -> None:
    """Check every workflow recipe (config key `train.recipes`) as the training job will read it,
    with the process layout of `train_settings` (config key `train`) when given.

    Called by the workflow when it starts, so a misspelled or mistyped key fails before any job runs
    (and before Snakemake removes a previous model's outputs), not inside the training job. The
    pipeline split is not checked here: it depends on the model each target trains
    (`check_stage_split`, per pretrain job).
    """
    for name, recipe in recipes.items():
        _check_workflow_run(recipe_for_model(recipe, "gpt2"), f"config key 'train.recipes.{name}'", train_settings)


# The Snakefile's targets of the presets (pretrain_small trains gpt2, ...): a named size must not
# take their names, nor a preset's (the model folder of pretrain_<name> is <dataset>-<name>).
PRESET_TARGETS = {"small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large", "xl": "gpt2-xl"}
# The preset a named size starts from when it does not name one.
SIZE_BASE = "gpt2"


def recipe_for_model(recipe: dict[str, Any], model: str, sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The workflow recipe `recipe` as the job for `model` runs it: `model` is a preset, or the name
    of a size in config key `train.sizes`, whose keys (model, n_layer, ...) replace the recipe's."""
    if sizes and model in sizes:
        return {**recipe, "model": SIZE_BASE, **sizes[model]}
    return {**recipe, "model": model}


def check_sizes(sizes: dict[str, Any], recipe_name: str, recipe: dict[str, Any],
                train_settings: dict[str, Any] | None = None) -> None:
    """Check every named size (config key `train.sizes`) as its pretrain_<name> job will train it:
    with the active recipe `recipe_name` and the process layout of `train_settings` (config key `train`).

    Called by the workflow when it starts, like `check_recipes`: a size that cannot be built (n_embd
    not a multiple of n_head) fails before any job runs; its pipeline split is checked by its own
    pretrain job (`check_stage_split`).
    """
    for name, _size in sizes.items():
        source = f"config key 'train.sizes.{name}'"
        if name in PRESETS or name in PRESET_TARGETS:
            taken = ("a model preset's" if name in PRESETS
                     else f"the target pretrain_{name}'s (preset {PRESET_TARGETS[name]})")
            raise UserError(f"{source}: the name {name!r} is {taken}; give the size another name (its target is "
                            "pretrain_<name>). Fix it in config/config.yaml or in --config.")
        _check_workflow_run(recipe_for_model(recipe, name, sizes), f"{source} (with recipe {recipe_name!r})",
                            train_settings)


def _check_workflow_run(recipe: dict[str, Any], source: str, train_settings: dict[str, Any] | None) -> None:
    """Check one workflow job's training keys (a recipe with its model) as the training job will read them."""
    parallel, replicas = None, 1
    if train_settings is not None:   # its own message: config key 'train.parallel'
        parallel = train_settings["parallel"]
        replicas = workflow_replicas(train_settings["nproc_per_node"], train_settings["nnodes"], parallel)
    try:
        values = workflow_run_config(recipe, shards_dir="shards", state_dir="train_state", save_model_path="final",
                                     replication_factor=replicas, parallel=parallel)
        cfg = TrainConfig.from_dict(values, source)
        check_config(cfg)
        if parallel is not None:
            check_layout(cfg, world_size=cfg.stages * replicas, n_layer=None)
    except UserError as err:
        text = str(err) if str(err).startswith(source) else f"{source}: {err}"
        raise UserError(f"{text}. Fix it in config/config.yaml or in --config.") from None


def check_stage_split(recipe: dict[str, Any], model: str, train_settings: dict[str, Any]) -> None:
    """Check config key `train.parallel`'s pipeline split against the model one pretrain job trains.

    recipe: the job's recipe with its model (`recipe_for_model`); model: the job's model wildcard (a
    preset or a named size). Called by the workflow for each pretrain job it plans, before any
    runs: a split is a property of a model (`[12, 12]` fits GPT-2 medium's 24 layers, not small's 12).
    """
    parallel = train_settings["parallel"]
    split = parallel["layers_per_stage"]
    stages = len(split or []) or parallel["pipeline_stages"]
    if stages <= 1:
        return
    n_layer = TrainConfig.from_dict(recipe, "train.recipes").model_size().n_layer
    target = next((f"pretrain_{name}" for name, preset in PRESET_TARGETS.items() if preset == model),
                  f"pretrain_{model}")
    trains = f"{target} trains {model} with {n_layer} layers"
    if stages > n_layer:
        key = "layers_per_stage" if split else "pipeline_stages"
        raise UserError(f"config key 'train.parallel.{key}': {stages} pipeline stages, but {trains}: use at most "
                        f"{n_layer} stages for this target. Fix it in config/config.yaml or in --config.")
    if split:
        try:
            stage_layers(n_layer, stages, split)
        except UserError:
            placed = sum(n for n in split if n >= 0)
            raise UserError(f"config key 'train.parallel.layers_per_stage': {split} places {placed} layers, but "
                            f"{trains}: make the counts add up to {n_layer} (-1: an even share of the rest), "
                            "or set it to null for an even split. Fix it in config/config.yaml or in --config."
                            ) from None


@dataclass(frozen=True)
class LossChunks:
    """How the LM-head loss is split, so the full [tokens, vocabulary] logits are never held at once.

    Our terms for the original's `--embedding-serialization-factor` / `--enable-sequence-serialized`
    / `--serialized-seq-len`: a number of vocabulary chunks, or a number of tokens per chunk. The
    token-chunk count depends on the batch (the last chunk may be short), hence `for_tokens`.
    """

    vocab_chunks: int = 1
    tokens_per_chunk: int | None = None   # None: the tokens are not chunked

    def for_tokens(self, n_tokens: int) -> dict[str, int]:
        """The `vocab_chunks`/`token_chunks` keyword arguments of `GPT.forward` for n_tokens positions."""
        token_chunks = 1 if self.tokens_per_chunk is None else max(1, math.ceil(n_tokens / self.tokens_per_chunk))
        return {"vocab_chunks": self.vocab_chunks, "token_chunks": token_chunks}


def loss_chunks_from_flags(embedding_serialization_factor: int, enable_sequence_serialized: bool,
                           serialized_seq_len: int) -> LossChunks:
    """The original's three loss-serialization flags in our terms.

    Sequence serialization wins: chunks of `serialized_seq_len` tokens and the whole vocabulary
    (the embedding factor is then unused); otherwise `embedding_serialization_factor` vocabulary chunks.
    """
    if enable_sequence_serialized:
        return LossChunks(vocab_chunks=1, tokens_per_chunk=serialized_seq_len)
    return LossChunks(vocab_chunks=embedding_serialization_factor)


@dataclass(frozen=True)
class ResolvedConfig:
    """A checked TrainConfig in our terms: what the training loop reads.

    `config.precision` already is what `--enable-half-partials` asked for; `loss_chunks` replaces the
    three serialization flags; `notes` say what the original's IPU flags became, printed once by
    the main process (the rank is only known once the processes have joined).
    """

    config: TrainConfig
    loss_chunks: LossChunks
    notes: tuple[str, ...]


def resolve(cfg: TrainConfig) -> ResolvedConfig:
    """Check `cfg` and translate the original's IPU flags, once; `cfg` itself is not changed."""
    check_config(cfg)
    notes = [f"--{name.replace('_', '-')} {getattr(cfg, name)}: {meaning}; it has no effect here."
             for name, meaning in IPU_ONLY_FLAGS.items() if getattr(cfg, name) not in (None, False)]
    precision = cfg.precision
    if cfg.enable_half_partials and precision == "fp32":
        precision = "fp16"
        notes.append("--enable-half-partials: half-precision matmul partials become --precision fp16 (autocast "
                     "with a grad scaler); use --precision bf16 on GPUs that support it.")
    chunks = loss_chunks_from_flags(cfg.embedding_serialization_factor, cfg.enable_sequence_serialized,
                                    cfg.serialized_seq_len)
    return ResolvedConfig(dataclasses.replace(cfg, precision=precision), chunks, tuple(notes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gpt2ipu train` flags: one per TrainConfig field (its help from the field), plus aliases."""
    parser.add_argument("--config", help="JSON or YAML file of training keys (the flags below override it)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {getattr(defaults, f.name)})"
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                help=help_text)
        elif f.name in ("layers_per_ipu", "matmul_proportion"):
            parser.add_argument(flag, nargs="+", type=int if f.name == "layers_per_ipu" else float,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--train-path", dest="dataset", default=argparse.SUPPRESS,
                        help="the original's name for --dataset (dynamic -> generated)")
    parser.add_argument("--pretrained-checkpoint", dest="checkpoint_input_dir", default=argparse.SUPPRESS,
                        help="the original's name for --checkpoint-input-dir")


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case), as boolean flags accept them."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `--config` file's keys, overridden by the flags given; not yet checked (see `resolve`)."""
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        values.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    if values.get("dataset") == "dynamic":
        values["dataset"] = "generated"
    for key in ("max_steps", *SIZE_KEYS):   # a --config file's "none": no cap; the preset's size
        if values.get(key) in ("none", "null"):
            values[key] = None
    return TrainConfig.from_dict(values, args.config or "command line")
