"""Training across processes (gloo on CPU): FSDP2, pipeline stages (1F1B, GPipe), pipeline x data
parallel, sharded (DCP) checkpoints, and the layout checks that run before any model is built.

The multi-process runs are compared with one process running the same global batch: a 4-layer
GPT-2 (the test preset's width), fp32, gradient accumulation and clipping on. The model's token
embedding is tied to its LM head; under pipeline stages the tied weight's two gradients are summed
across processes in another order than one process adds them, which moves the weights by float
rounding that Adam then magnifies where a gradient is near zero, so the learning rate here is 1e-4
(docs/parallel.md has the figures; an untied model reproduces bit for bit).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2ipu.errors import UserError
from gpt2ipu.model import GPT
from gpt2ipu.model.gpt import GPTConfig
from gpt2ipu.train.config import TrainConfig, check_layout, stage_layers

STEPS = 10
COMMON = ["--vocab-size", "512", "--max-len", "32", "--generated-samples", "400", "--learning-rate", "1e-4",
          "--grad-clip", "0.5", "--progress", "false", "--device", "cpu", "--eval-every", "5",
          "--checkpoint-every", "5", "--keep-checkpoints", "5"]
GLOBAL_BATCH = 8


def tiny_config(tied: bool = True) -> GPTConfig:
    return GPTConfig(vocab_size=512, n_positions=32, n_embd=64, n_layer=4, n_head=2, tie_word_embeddings=tied)


# --- layout checks and pieces, in this process ---------------------------------------------------

def test_stage_layers_split_evenly_or_as_given():
    assert stage_layers(12, 4) == [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(12, 4, [0, 4, 4, 4]) == [range(0, 0), range(0, 4), range(4, 8), range(8, 12)]
    assert stage_layers(10, 3, [2, -1, -1]) == [range(0, 2), range(2, 6), range(6, 10)]
    with pytest.raises(UserError, match="places 7 layers, but the model has 12"):
        stage_layers(12, 2, [3, 4])
    with pytest.raises(UserError, match="one layer count"):
        stage_layers(12, 3, [6, 6])


@pytest.mark.parametrize("flags, world, message", [
    (dict(replication_factor=2), 1, "torchrun --nproc_per_node 2"),
    (dict(pipeline_stages=2, replication_factor=2), 2, "2 pipeline stage(s) x 2 replica(s)"),
    (dict(layers_per_ipu=[3, 3, 3]), 3, "places 9 layers, but the model has 4"),
    (dict(pipeline_stages=5), 5, "5 pipeline stages for a model of 4 layers"),
    (dict(fsdp=True, replicated_tensor_sharding=True, replication_factor=2), 2, "choose one"),
    (dict(pipeline_stages=2, replicated_tensor_sharding=True), 2, "use --fsdp"),
    (dict(fsdp=True, replication_factor=2, precision="fp16"), 2, "use --precision bf16"),
    (dict(layers_per_ipu=[2, 2], ipus_per_replica=4), 2, "give one layer count per stage"),
])
def test_layouts_that_cannot_run_fail_before_the_model_is_built(flags, world, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(TrainConfig(**flags), world_size=world, n_layer=4)


def test_layer_split_comes_from_the_original_flags():
    assert check_layout(TrainConfig(layers_per_ipu=[1, 3]), world_size=2, n_layer=4) == [1, 3]
    assert check_layout(TrainConfig(ipus_per_replica=2, replication_factor=2), world_size=4, n_layer=4) == [2, 2]
    assert check_layout(TrainConfig(fsdp=True, replication_factor=2), world_size=2, n_layer=4) is None


def test_workflow_parallel_settings_become_the_runs_layout():
    from gpt2ipu.train.config import check_recipes, workflow_replicas, workflow_run_config

    parallel = {"fsdp": True, "pipeline_stages": 2, "layers_per_stage": None, "schedule": "gpipe"}
    assert workflow_replicas(4, 2, parallel) == 4
    values = workflow_run_config({"max_len": 64}, shards_dir="s", state_dir="t", save_model_path="f",
                                 replication_factor=4, parallel=parallel)
    cfg = TrainConfig.from_dict(values, "test")
    assert (cfg.stages, cfg.fsdp, cfg.pipeline_schedule, cfg.replication_factor) == (2, True, "gpipe", 4)
    with pytest.raises(UserError, match="2 pipeline stages do not divide the 3 processes"):
        workflow_replicas(3, 1, parallel)
    settings = {"nproc_per_node": 2, "nnodes": 1, "parallel": {**parallel, "layers_per_stage": [6, 5]}}
    check_recipes({"r": {"max_len": 64}}, settings)   # the split is each target's to check (below)


def test_workflow_checks_a_stage_split_against_the_model_its_target_trains():
    """[12, 12] fits GPT-2 medium's 24 layers: pretrain_medium plans; pretrain_small (12) and a named size are
    refused, naming the config key and the target's layer count; the start-up check accepts the split."""
    from gpt2ipu.train.config import check_recipes, check_sizes, check_stage_split, recipe_for_model

    recipe = {"max_len": 64}
    settings = {"nproc_per_node": 2, "nnodes": 1,
                "parallel": {"fsdp": False, "pipeline_stages": 1, "layers_per_stage": [12, 12], "schedule": "1f1b"}}
    sizes = {"small4": {"model": "gpt2", "n_layer": 4}}
    check_recipes({"r": recipe}, settings)
    check_sizes(sizes, "r", recipe, settings)
    check_stage_split(recipe_for_model(recipe, "gpt2-medium"), "gpt2-medium", settings)
    with pytest.raises(UserError, match=r"'train\.parallel\.layers_per_stage': \[12, 12\] places 24 layers, but "
                                        r"pretrain_small trains gpt2 with 12 layers: make the counts add up to 12"):
        check_stage_split(recipe_for_model(recipe, "gpt2"), "gpt2", settings)
    with pytest.raises(UserError, match=r"but pretrain_small4 trains small4 with 4 layers"):
        check_stage_split(recipe_for_model(recipe, "small4", sizes), "small4", settings)
    even = {**settings, "parallel": {**settings["parallel"], "layers_per_stage": None, "pipeline_stages": 8}}
    check_stage_split(recipe_for_model(recipe, "gpt2"), "gpt2", even)
    with pytest.raises(UserError, match=r"'train\.parallel\.pipeline_stages': 8 pipeline stages, but "
                                        r"pretrain_small4 trains small4 with 4 layers: use at most 4"):
        check_stage_split(recipe_for_model(recipe, "small4", sizes), "small4", even)


def test_stages_chained_compute_the_whole_models_loss_and_gradients():
    from gpt2ipu.train.pipeline import StageModule

    torch.manual_seed(0)
    model = GPT(tiny_config())
    ids = torch.randint(0, 512, (2, 32))
    labels = torch.randint(0, 512, (2, 32))
    expected = model(ids, labels)
    expected.loss.backward()

    first = StageModule(model, range(0, 1), first=True, last=False, loss_chunks={})
    last = StageModule(model, range(1, 4), first=False, last=True, loss_chunks={})
    assert last.lm_head.weight is not model.wte.weight   # the last stage's own copy of the tied weight
    assert torch.equal(last.lm_head.weight, model.wte.weight)
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss, accuracy = last(first(ids), labels=labels)
    loss.backward()
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert float(accuracy) == float(expected.accuracy)
    assert {name for name, _ in first.named_parameters()} | {name for name, _ in last.named_parameters()} \
        == {name for name, _ in model.named_parameters()} | {"lm_head.weight"}   # the whole model's names
    tied_sum = first.wte.weight.grad + last.lm_head.weight.grad   # what sync_tied_grads all-reduces
    assert torch.allclose(tied_sum, want_grads["wte.weight"], atol=1e-6)
    for name, param in last.h.named_parameters():
        assert torch.allclose(param.grad, want_grads[f"h.{name}"], atol=1e-6)


def test_a_stage_built_from_the_meta_model_holds_one_process_initial_weights():
    """Each process materializes only its share; by (seed, name) it gets one process's values."""
    from gpt2ipu.model.gpt import initial_value
    from gpt2ipu.train.parallel import materialize
    from gpt2ipu.train.pipeline import StageModule

    whole = GPT(tiny_config(), seed=7)
    with torch.device("meta"):
        meta = GPT(tiny_config())
    last = StageModule(meta, range(2, 4), first=False, last=True, loss_chunks={})
    materialize(last, torch.device("cpu"), lambda name, shape: initial_value(name, shape, meta.config, 7))
    assert {name for name, _ in last.named_parameters()} == {"h.2." + n for n, _ in whole.h[2].named_parameters()} \
        | {"h.3." + n for n, _ in whole.h[3].named_parameters()} | {"ln_f.weight", "ln_f.bias", "lm_head.weight"}
    ones = dict(whole.named_parameters())
    for name, param in last.named_parameters():
        assert torch.equal(param, ones.get(name, whole.wte.weight)), name   # lm_head.weight: the tied copy
    assert not torch.equal(whole.h[2].mlp.c_fc.weight, GPT(tiny_config(), seed=8).h[2].mlp.c_fc.weight)
    # GPT-2's init, as a one-process GPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).
    assert whole.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert whole.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert torch.equal(whole.h[0].ln_1.weight, torch.ones(64)) and not whole.h[0].mlp.c_fc.bias.any()


def test_clip_over_one_process_is_pytorchs():
    from gpt2ipu.train.parallel import DistInfo, clip_grad_norm_

    torch.manual_seed(0)
    ours, theirs = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)], None
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(5, 3)
        b.grad = a.grad.clone()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    norm = clip_grad_norm_(ours, 0.5, info)
    assert float(norm) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, 0.5)), rel=1e-6)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    """DCP's save, consolidation and load, without a process group (no_dist)."""
    from gpt2ipu.model.hf import load_hf_dir
    from gpt2ipu.train.optim import make_optimizer, train_step
    from gpt2ipu.train.sharded_state import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint

    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = make_optimizer(model, lr=1e-3)
    ids = torch.randint(0, 512, (2, 32))
    train_step(model, optimizer, [(ids, ids)], max_grad_norm=1.0)
    save_sharded_checkpoint(tmp_path, 1, model, optimizer, {"step": 1}, {"model": "tiny"}, keep=2, is_main=True,
                            barrier=lambda: None, model_config=model.config)
    folder = tmp_path / "checkpoints" / "step-00000001"
    assert is_sharded(folder) and not list((tmp_path / "checkpoints").glob(".*"))
    consolidated = load_hf_dir(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(consolidated.state_dict()[name], tensor), name

    torch.manual_seed(1)
    other = GPT(tiny_config())
    other_optimizer = make_optimizer(other, lr=1e-3)
    train_step(other, other_optimizer, [(ids, ids)], max_grad_norm=1.0)   # state to be replaced
    assert load_sharded_checkpoint(folder, other, other_optimizer)["step"] == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], other_optimizer.state[q]["exp_avg_sq"])


def test_a_tied_weights_copy_in_a_checkpoint_is_folded_when_equal_and_refused_when_not(tmp_path):
    """A checkpoint whose `lm_head.weight` is a tensor of its own, with its own optimizer state (what a
    pipeline's last stage saves), loads into a whole tied model from `wte.weight` when the two are
    equal, and is refused by name when they are not. Written here by an untied model in one process."""
    from gpt2ipu.train.optim import make_optimizer, train_step
    from gpt2ipu.train.sharded_state import load_sharded_checkpoint, save_sharded_checkpoint

    torch.manual_seed(0)
    untied = GPT(tiny_config(tied=False))
    optimizer = make_optimizer(untied, lr=1e-3)
    ids = torch.randint(0, 512, (2, 32))
    train_step(untied, optimizer, [(ids, ids)], max_grad_norm=1.0)
    with torch.no_grad():   # make the copy equal to the weight, as pipeline training keeps it
        untied.lm_head.weight.copy_(untied.wte.weight)
        for key, value in optimizer.state[untied.wte.weight].items():
            optimizer.state[untied.lm_head.weight][key].copy_(value)

    def save(step: int) -> Path:
        save_sharded_checkpoint(tmp_path, step, untied, optimizer, {"step": step}, {}, keep=5, is_main=True,
                                barrier=lambda: None, model_config=untied.config)
        return tmp_path / "checkpoints" / f"step-{step:08d}"

    tied = GPT(tiny_config())
    tied_optimizer = make_optimizer(tied, lr=1e-3)
    train_step(tied, tied_optimizer, [(ids, ids)], max_grad_norm=1.0)
    assert load_sharded_checkpoint(save(1), tied, tied_optimizer)["step"] == 1
    assert torch.equal(tied.lm_head.weight, untied.wte.weight) and tied.lm_head.weight is tied.wte.weight
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(tied_optimizer.state[tied.wte.weight][key], optimizer.state[untied.wte.weight][key])

    with torch.no_grad():
        optimizer.state[untied.lm_head.weight]["exp_avg"] += 1e-7
    with pytest.raises(UserError, match=r"step-00000002: the pipeline's last stage holds a copy of the tied "
                                        r"embedding \(lm_head.weight\) that differs from the first stage's "
                                        r"wte.weight: its optimizer state 'exp_avg'"):
        load_sharded_checkpoint(save(2), tied, tied_optimizer)


def test_a_checkpoint_of_another_model_is_refused_before_it_is_read(tmp_path):
    from types import SimpleNamespace

    from gpt2ipu.model.hf import save_hf_dir
    from gpt2ipu.train.loop import check_same_model, resume

    folder = tmp_path / "step-00000005"
    save_hf_dir(GPT(tiny_config()), folder)
    torch.save({}, folder / "training_state.pt")   # never read: the refusal comes first
    check_same_model(folder, tiny_config())
    wider = GPTConfig(vocab_size=512, n_positions=32, n_embd=128, n_layer=6, n_head=2)
    run = SimpleNamespace(cfg=TrainConfig(resume_training_from_checkpoint=str(folder)), model_config=wider)
    with pytest.raises(UserError, match=r"step-00000005: this checkpoint is of another model than this run's: "
                                        r"n_layer 4 there, 6 here, n_embd 64 there, 128 here; resume it with the "
                                        r"settings of the run that wrote it"):
        resume(run, print)


# --- runs across processes (torchrun, gloo) ------------------------------------------------------

def single_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


SEED = 42   # gpt2ipu train's default --seed
# What tiny_config() is as `gpt2ipu train` flags: a run with them builds GPT(tiny_config(), seed=SEED).
FRESH = ["--model", "gpt2-test", "--n-layer", "4", "--n-embd", "64", "--n-head", "2", "--seed", str(SEED)]


def train_command(nproc: int, port: int, init_dir: Path | None, state_dir: Path, *flags) -> list[str]:
    """A `gpt2ipu train` run from the weights in init_dir, or (None) initialised as FRESH says."""
    start = ["--checkpoint-input-dir", str(init_dir)] if init_dir else FRESH
    train = ["-m", "gpt2ipu", "train", *start, *COMMON, "--state-dir", str(state_dir), *map(str, flags)]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
            *train]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=single_thread_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(state_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (state_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 4-layer model folder, the weights a fresh run with --seed SEED starts from, and one process's
    12 steps from it (global batch 8: 2 x 4 micro-batches)."""
    root = tmp_path_factory.mktemp("parallel")
    from gpt2ipu.model.hf import save_hf_dir

    save_hf_dir(GPT(tiny_config(), seed=SEED), root / "init")
    run(train_command(1, 0, root / "init", root / "one", "--batch-size", 2, "--gradient-accumulation", 4,
                      "--max-steps", STEPS + 2))
    return root, losses(root / "one")


LAYOUTS = {   # name: (processes, flags); each with the global batch of 8
    "fsdp": (2, ["--fsdp", "--replication-factor", 2, "--batch-size", 2, "--gradient-accumulation", 2]),
    "pp_1f1b": (2, ["--pipeline-stages", 2, "--batch-size", 2, "--gradient-accumulation", 4]),
    "pp2_x_fsdp2": (4, ["--pipeline-stages", 2, "--replication-factor", 2, "--fsdp", "--batch-size", 2,
                        "--gradient-accumulation", 2]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_one_process(reference, layout):
    root, expected = reference
    nproc, flags = LAYOUTS[layout]
    port = 29610 + list(LAYOUTS).index(layout)
    # FSDP layouts start fresh: each process initialises only its shard (of its stage) from the
    # meta model, and must reach the weights one process saved in `init`; 1F1B starts from `init`.
    init = None if "--fsdp" in flags else root / "init"
    result = run(train_command(nproc, port, init, root / layout, "--max-steps", STEPS, *flags))
    got = losses(root / layout)
    assert len(got) == STEPS
    assert got == pytest.approx(expected[:STEPS], rel=1e-5)
    summary = json.loads(result.stdout.strip().splitlines()[-1])   # one line: rank 0 alone prints it
    assert len(result.stdout.strip().splitlines()) == 1 and len(summary["rank_peak_memory_mb"]) == nproc
    assert (root / layout / "checkpoints" / f"step-{STEPS:08d}" / "sharded" / ".metadata").is_file()


@pytest.mark.slow
def test_fsdp_over_one_process_reproduces_one_process(reference, tmp_path):
    """--fsdp without torchrun: a group of one and a 1 x 1 mesh (it used to fail on the missing mesh)."""
    root, expected = reference
    run(train_command(1, 0, root / "init", tmp_path / "s", "--fsdp", "--batch-size", 2, "--gradient-accumulation", 4,
                      "--max-steps", 3))
    assert losses(tmp_path / "s") == pytest.approx(expected[:3], rel=1e-5)
    assert (tmp_path / "s" / "checkpoints" / "step-00000003" / "sharded" / ".metadata").is_file()


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process_and_loads_in_transformers(reference):
    from transformers import GPT2LMHeadModel

    from gpt2ipu.model.hf import load_hf_dir

    root, expected = reference
    state = root / "fsdp"
    if not (state / "checkpoints").is_dir():
        run(train_command(2, 29620, root / "init", state, "--max-steps", STEPS, *LAYOUTS["fsdp"][1]))
    folder = state / "checkpoints" / f"step-{STEPS:08d}"
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_hf_dir(folder).eval().logits(ids)
        theirs = GPT2LMHeadModel.from_pretrained(folder).eval()(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)

    result = run(train_command(1, 0, root / "init", state, "--batch-size", 2, "--gradient-accumulation", 4,
                               "--max-steps", STEPS + 2))
    assert f"resuming from {folder}" in result.stderr
    assert losses(state) == pytest.approx(expected, rel=1e-5)   # its 10 steps, then this process's 2


@pytest.mark.slow
def test_gpipe_pipeline_reproduces_one_process_across_a_sigkill(reference, tmp_path):
    root, expected = reference
    flags = ["--max-steps", STEPS, "--layers-per-ipu", 1, 3, "--pipeline-schedule", "gpipe", "--batch-size", 2,
             "--gradient-accumulation", 4, "--checkpoint-every", 3,
             "--save-model-path", tmp_path / "final"]
    command = train_command(2, 29625, root / "init", tmp_path / "s", *flags)
    proc = subprocess.Popen(command, env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)   # its own process group: torchrun and both workers die
    checkpoints = tmp_path / "s" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(checkpoints.glob("step-*/training_state.pt")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final").exists(), "the run finished before it could be killed"

    result = run(command)
    assert "resuming from" in result.stderr
    assert losses(tmp_path / "s") == pytest.approx(expected[:STEPS], rel=1e-5)
    assert (tmp_path / "final" / "model.safetensors").is_file()


# --- resuming in another layout ------------------------------------------------------------------

def sharded_run(reference, name: str) -> Path:
    """The state folder of a LAYOUTS run (made here when that test did not run first)."""
    root, _ = reference
    nproc, flags = LAYOUTS[name]
    if not (root / name / "checkpoints" / f"step-{STEPS:08d}").is_dir():
        run(train_command(nproc, 29930 + list(LAYOUTS).index(name), root / "init", root / name, "--max-steps", STEPS,
                          *flags))
    return root / name


def resumable_copy(source: Path, step: int, target: Path) -> Path:
    """A state folder holding `source`'s checkpoint of `step` and its metrics up to there."""
    import shutil

    shutil.copytree(source / "checkpoints" / f"step-{step:08d}", target / "checkpoints" / f"step-{step:08d}")
    records = [line for line in (source / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in records))
    return target


RESUME_LAYOUTS = {   # name: (processes, flags), in the order a run moves through them; the global batch of 8
    "pp3": (3, ["--pipeline-stages", 3, "--batch-size", 2, "--gradient-accumulation", 4]),
    "one": (1, ["--batch-size", 2, "--gradient-accumulation", 4]),
    "pp2_x_fsdp2": (4, ["--pipeline-stages", 2, "--fsdp", "--replication-factor", 2, "--batch-size", 2,
                        "--gradient-accumulation", 2]),
    "fsdp2": (2, ["--fsdp", "--replication-factor", 2, "--batch-size", 2, "--gradient-accumulation", 2]),
}


@pytest.mark.slow
def test_a_run_resumed_in_other_layouts_reproduces_one_process(reference, tmp_path):
    """One run moved through four layouts, resuming each time from the checkpoint the previous one
    wrote: 2 stages -> 3 stages -> one process -> 2 stages x FSDP 2 -> FSDP x 2 (one step each, two in
    the last). So: a pipeline checkpoint on another number of stages and in one process (the LM
    head's copy folded into wte), a single-file checkpoint into FSDP-sharded stages (the last
    stage's copy from wte), a pipeline x FSDP checkpoint into FSDP alone. Every step's loss equals
    the uninterrupted one-process run's; each depends on the optimizer state, scheduler, data
    position and RNG that the previous layout saved."""
    root, expected = reference
    state = resumable_copy(sharded_run(reference, "pp_1f1b"), 5, tmp_path / "s")
    said = []
    for step, layout in enumerate(RESUME_LAYOUTS, start=6):
        nproc, flags = RESUME_LAYOUTS[layout]
        last = step + (layout == "fsdp2")
        result = run(train_command(nproc, 29900 + step, root / "init", state, "--max-steps", last,
                                   "--checkpoint-every", 1, *flags))
        said.append(next(line for line in result.stderr.splitlines() if "resuming from" in line))
        assert losses(state) == pytest.approx(expected[:last], rel=1e-5), layout
    assert [line.split("(written by ")[1] for line in said] == [
        "2 pipeline stages; this run: 3 pipeline stages)", "3 pipeline stages; this run: one process)",
        "one process; this run: 2 pipeline stages x FSDP over 2)",
        "2 pipeline stages x FSDP over 2; this run: FSDP over 2)"]


@pytest.mark.slow
def test_compiled_blocks_under_stages_and_fsdp_reproduce_eager(reference, tmp_path):
    """--compile with 2 stages x FSDP 2: each block compiled, then sharded; the losses are eager's."""
    root, expected = reference
    nproc, flags = LAYOUTS["pp2_x_fsdp2"]
    result = run(train_command(nproc, 29830, root / "init", tmp_path / "s", "--max-steps", 2, "--compile", *flags,
                               "--checkpoint-every", 0, "--final-checkpoint", "false", "--eval-batches", 0))
    assert len(result.stdout.strip().splitlines()) == 1
    assert losses(tmp_path / "s") == pytest.approx(expected[:2], rel=1e-5)
