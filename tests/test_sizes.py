"""Issue 18, "Any model size": --n-layer / --n-embd / --n-head / --n-positions (and the same recipe
keys) over the --model preset, one message for a size that cannot be built, named sizes in
config key train.sizes with their pretrain_<name> targets, and config.json carrying the size so
transformers, evaluate and generate load the model."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt2ipu.errors import UserError
from gpt2ipu.sizes import ModelSize, model_size
from gpt2ipu.train.config import (
    TrainConfig,
    check_recipes,
    check_sizes,
    check_stage_split,
    config_from_args,
    recipe_for_model,
)

REPO = Path(__file__).resolve().parents[1]


def train_flags(*flags) -> TrainConfig:
    """The command line `gpt2ipu train FLAGS`, read as the command reads it."""
    from gpt2ipu.cli import build_parser

    return config_from_args(build_parser("train").parse_args(["train", *map(str, flags)]))


def shipped_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


# ---- flags over the preset ----------------------------------------------------------------------

def test_size_flags_replace_the_presets_own():
    from gpt2ipu.train.loop import model_config_of

    baby = model_config_of(train_flags("--model", "gpt2", "--n-layer", 6, "--n-embd", 384, "--n-head", 6,
                                       "--max-len", 64))
    assert (baby.n_layer, baby.n_embd, baby.n_head, baby.n_positions) == (6, 384, 6, 64)
    # One key replaced: the preset keeps the rest; n_positions may exceed the samples' length.
    four = model_config_of(train_flags("--model", "gpt2", "--n-layer", 4, "--n-positions", 256, "--max-len", 64))
    assert (four.n_layer, four.n_embd, four.n_head, four.n_positions) == (4, 768, 12, 256)
    assert model_size("gpt2-medium", 128) == ModelSize(n_layer=24, n_embd=1024, n_head=16, n_positions=128)


def test_a_size_that_cannot_be_built_gets_one_message_listing_every_problem():
    with pytest.raises(UserError) as info:
        train_flags("--n-layer", 0, "--n-embd", 100, "--n-head", 3, "--n-positions", 32, "--max-len", 64).model_size()
    message = str(info.value)
    assert message.startswith("model size: ") and message.count(";") >= 2
    assert "n_layer 0 (--n-layer) must be at least 1" in message
    assert "n_embd 100 (--n-embd) is not a multiple of n_head 3 (--n-head)" in message and "99 or 102" in message
    assert "n_positions 32 (--n-positions) is less than max_len 64 (--max-len)" in message
    # A value the preset gave is named as the preset's, so the user sees which flag to add.
    with pytest.raises(UserError, match=r"n_embd 768 \(preset gpt2's\) is not a multiple of n_head 5 \(--n-head\)"):
        model_size("gpt2", 128, n_head=5)


def test_the_command_refuses_a_bad_size_with_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-m", "gpt2ipu", "train", "--n-embd", "100", "--n-head", "3",
                             "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "gpt2ipu train: error: model size: n_embd 100 (--n-embd) is not a multiple of n_head 3 (--n-head): each "
        "head takes n_embd / n_head features; use an n_embd of 99 or 102, or an n_head that divides 100"]


def test_size_flags_with_a_checkpoint_are_refused():
    from gpt2ipu.train.config import check_config

    with pytest.raises(UserError, match=r"--n-layer, --n-head set the size of a fresh model, but "
                                        r"--checkpoint-input-dir ck brings its own"):
        check_config(TrainConfig(checkpoint_input_dir="ck", n_layer=4, n_head=2))


def test_pipeline_stage_check_uses_the_resized_layers(tmp_path):
    from gpt2ipu.train.loop import train

    # GPT-2 small has 12 layers; resized to 2, three stages cannot be placed, before anything is built.
    with pytest.raises(UserError, match="3 pipeline stages for a model of 2 layers: use at most 2 stages"):
        train(TrainConfig(model="gpt2", n_layer=2, pipeline_stages=3, device="cpu", state_dir=str(tmp_path)))
    settings = {"nproc_per_node": 4, "nnodes": 1,
                "parallel": {"fsdp": False, "pipeline_stages": 4, "layers_per_stage": None, "schedule": "1f1b"}}
    check_stage_split(recipe_for_model({"max_len": 64}, "gpt2"), "gpt2", settings)   # 12 layers fit 4 stages
    # checked per pretrain job, against the model its target trains (not when the workflow starts)
    check_recipes({"r": {"max_len": 64, "n_layer": 3}}, settings)
    with pytest.raises(UserError, match=r"'train\.parallel\.pipeline_stages': 4 pipeline stages, but pretrain_small "
                                        r"trains gpt2 with 3 layers"):
        check_stage_split(recipe_for_model({"max_len": 64, "n_layer": 3}, "gpt2"), "gpt2", settings)
    sizes = {"three": {"n_layer": 3}}
    check_sizes(sizes, "r", {"max_len": 64}, settings)
    with pytest.raises(UserError, match=r"4 pipeline stages, but pretrain_three trains three with 3 layers"):
        check_stage_split(recipe_for_model({"max_len": 64}, "three", sizes), "three", settings)


# ---- recipe keys and named sizes (config key train.sizes) ------------------------------------------

def test_shipped_sizes_pass_with_every_recipe():
    config = shipped_config()
    assert config["train"]["sizes"]["baby"] == {"model": "gpt2", "n_layer": 6, "n_embd": 384, "n_head": 6}
    for name, recipe in config["train"]["recipes"].items():
        check_sizes(config["train"]["sizes"], name, recipe, config["train"])


def test_a_size_replaces_the_recipes_size_keys_and_a_preset_target_keeps_them():
    recipe = {"max_len": 64, "n_layer": 3, "n_head": 4}
    sizes = {"baby": {"n_layer": 6, "n_embd": 384, "n_head": 6}}
    assert recipe_for_model(recipe, "baby", sizes) == {"max_len": 64, "model": "gpt2", "n_layer": 6, "n_embd": 384,
                                                       "n_head": 6}
    assert recipe_for_model(recipe, "gpt2-medium", sizes) == {**recipe, "model": "gpt2-medium"}


def test_a_bad_named_size_or_recipe_size_names_its_key():
    recipe = {"max_len": 128}
    with pytest.raises(UserError) as info:
        check_sizes({"odd": {"n_embd": 100, "n_head": 3}}, "sample", recipe)
    message = str(info.value)
    assert message.startswith("config key 'train.sizes.odd' (with recipe 'sample'): model size: n_embd 100")
    assert message.endswith("Fix it in config/config.yaml or in --config.")
    with pytest.raises(UserError, match=r"train\.sizes\.long' \(with recipe 'sample'\): model size: n_positions 64 "
                                        r"\(--n-positions\) is less than max_len 128"):
        check_sizes({"long": {"n_positions": 64}}, "sample", recipe)
    with pytest.raises(UserError, match=r"train\.recipes\.sample': model size: n_embd 768 \(preset gpt2's\) is not "
                                        r"a multiple of n_head 7"):
        check_recipes({"sample": {"max_len": 128, "n_head": 7}})


@pytest.mark.parametrize("name, taken", [("gpt2-medium", "a model preset's"),
                                         ("small", "the target pretrain_small's (preset gpt2)")])
def test_a_named_size_cannot_take_a_preset_or_its_target(name, taken):
    with pytest.raises(UserError, match=re.escape(f"train.sizes.{name}': the name '{name}' is {taken};")):
        check_sizes({name: {"n_layer": 2}}, "sample", {"max_len": 128})


# ---- config.json carries the size ---------------------------------------------------------------

def test_a_resized_model_loads_in_transformers_evaluate_and_generate(tmp_path):
    """A model of a size no preset has, as training builds and saves it (train.loop.model_config_of,
    model.hf.save_hf_dir), loaded by transformers (the same logits) and by the loader that gpt2ipu
    evaluate and generate use."""
    transformers = pytest.importorskip("transformers")
    from gpt2ipu.generate.batch import generate_texts, load_for_generation
    from gpt2ipu.generate.sampling import SamplingConfig
    from gpt2ipu.model import GPT
    from gpt2ipu.model.hf import save_hf_dir
    from gpt2ipu.pretrained import load_model
    from gpt2ipu.train.loop import model_config_of

    torch.manual_seed(0)
    cfg = train_flags("--model", "gpt2", "--n-layer", 3, "--n-embd", 48, "--n-head", 4, "--n-positions", 40,
                      "--max-len", 16)
    final = save_hf_dir(GPT(model_config_of(cfg)), tmp_path / "final")
    config = json.loads((final / "config.json").read_text())
    assert {key: config[key] for key in ("n_layer", "n_embd", "n_head", "n_positions", "n_ctx")} == \
        {"n_layer": 3, "n_embd": 48, "n_head": 4, "n_positions": 40, "n_ctx": 40}

    theirs = transformers.GPT2LMHeadModel.from_pretrained(final).eval()
    ours = load_model(final, "cpu")
    input_ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(input_ids), theirs(input_ids).logits, rtol=1e-4, atol=1e-4)

    try:
        model, tokenizer, _ = load_for_generation(final, "cpu")
    except UserError as err:   # no GPT-2 vocabulary on this machine: the loading above is the check
        pytest.skip(str(err))
    [record] = generate_texts(model, tokenizer, ["The"], SamplingConfig(max_new_tokens=3, greedy=True))
    assert record["new_tokens"] == 3


# ---- the workflow -------------------------------------------------------------------------------

@pytest.mark.slow
def test_named_size_targets_and_a_bad_size_at_workflow_start(tmp_path):
    for name in ("Snakefile", "workflow", "config", "profiles", "environment.yml"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)

    def snakemake(*args):
        result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stdout + result.stderr

    # pretrain_baby builds the baby's model folder, through the same pretrain rule as the presets;
    # the evaluation and generation rules take that folder like any other.
    code, output = snakemake("pretrain_baby", "results/eval/sample-baby/lambada.json",
                             "results/generate/sample-baby/continuations.jsonl")
    assert code == 0, output[-3000:]
    assert "results/models/sample-baby/final" in output and "rule pretrain_baby:" in output
    for rule in ("pretrain", "evaluate_lambada_any", "generate_any", "report_pages"):
        assert f"rule {rule}:" in output or f"localrule {rule}:" in output, rule

    code, output = snakemake("data", "--config", "train={sizes: {odd: {n_embd: 100, n_head: 3}}}")
    assert code != 0 and "Traceback" not in output
    assert "config key 'train.sizes.odd' (with recipe 'sample'): model size: n_embd 100" in output
    assert not (tmp_path / "results").exists()
