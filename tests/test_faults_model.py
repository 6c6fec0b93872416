"""Faults a user can make with a model folder (issue 13): a config.json that does not belong to its
weights ends in one UserError naming the folder, the tensor and both shapes, not a load_state_dict
traceback; and every file of a saved model or checkpoint gets the umask's mode, like other outputs."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2ipu.cli import main as cli_main
from gpt2ipu.errors import UserError
from gpt2ipu.model.gpt import GPT, config_for
from gpt2ipu.model.hf import load_hf_dir, save_hf_dir, write_hf_files
from gpt2ipu.train.state import save_training_checkpoint

# gpt2-test: 2 layers, n_embd 64; GPT-2's vocabulary so the offline GPT-2 tokenizer fits it.
VOCAB, POSITIONS = 50257, 32


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "model"
    save_hf_dir(GPT(config_for("gpt2-test", POSITIONS, vocab_size=VOCAB)), folder)
    return folder


def edited_copy(saved_model, tmp_path, **edits):
    """A copy of the saved folder whose config.json has `edits` applied."""
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved_model / "model.safetensors").read_bytes())
    config = json.loads((saved_model / "config.json").read_text())
    config.update(edits)
    if "n_positions" in edits:
        config["n_ctx"] = edits["n_positions"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# tensor (as named in model.safetensors), shape found, shape the edited config implies, config key shown
SHAPE_CASES = {
    "n_embd": ({"n_embd": 384}, "transformer.wte.weight", "[50257, 64]", "[50257, 384]", "n_embd 384"),
    "vocab_size": ({"vocab_size": 50000}, "transformer.wte.weight", "[50257, 64]", "[50000, 64]", "vocab_size 50000"),
    "n_positions": ({"n_positions": 1024}, "transformer.wpe.weight", "[32, 64]", "[1024, 64]", "n_positions 1024"),
}


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_config_that_does_not_fit_the_weights_names_tensor_and_shapes(saved_model, tmp_path, case):
    edits, tensor, found, implied, key = SHAPE_CASES[case]
    folder = edited_copy(saved_model, tmp_path, **edits)
    with pytest.raises(UserError) as err:
        load_hf_dir(folder)
    message = str(err.value)
    assert str(folder) in message and tensor in message and "model.safetensors" in message
    assert f"has shape {found}" in message and f"implies {implied}" in message and key in message
    assert "config.json" in message and "does not belong to these weights" in message


def test_conv1d_tensor_shapes_are_given_in_the_files_layout(saved_model, tmp_path):
    # One MLP matrix of the wrong width: a Conv1D tensor, stored [in, out], reported that way.
    folder = edited_copy(saved_model, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 128)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight in model\.safetensors has shape "
                                        r"\[64, 128\] but config\.json \(n_embd 64\) implies \[64, 256\]; "):
        load_hf_dir(folder)


def test_missing_tensors_are_one_clear_message(saved_model, tmp_path):
    folder = edited_copy(saved_model, tmp_path, n_layer=3)
    with pytest.raises(UserError) as err:
        load_hf_dir(folder)
    message = str(err.value)
    assert str(folder) in message and "n_layer 3" in message and "missing" in message
    assert "12 tensor(s) missing (transformer.h.2.attn.c_attn.bias" in message
    assert "does not belong to these weights" in message


def test_n_embd_not_a_multiple_of_n_head_names_the_config(saved_model, tmp_path):
    folder = edited_copy(saved_model, tmp_path, n_embd=63)
    with pytest.raises(UserError, match=r"config\.json: n_embd \(63\) must be a multiple of n_head \(2\)"):
        load_hf_dir(folder)


def assert_clean_cli_error(capsys, argv, folder):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error(s) in loading state_dict" not in err
    assert str(folder) in err and "transformer.wte.weight" in err
    assert "has shape [50257, 64]" in err and "implies [50257, 384]" in err


def test_evaluate_and_generate_report_the_mismatch_without_traceback(saved_model, tmp_path, capsys):
    folder = edited_copy(saved_model, tmp_path, n_embd=384)
    data = tmp_path / "lambada.jsonl"
    data.write_text(json.dumps({"text": "The cat sat on the mat and looked at the dog"}) + "\n", encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    common = ["--model-dir", str(folder), "--device", "cpu"]
    assert_clean_cli_error(capsys, ["evaluate", "lambada", *common, "--data", str(data),
                                    "--out", str(tmp_path / "lambada.json")], folder)
    assert not (tmp_path / "lambada.json").exists()
    assert_clean_cli_error(capsys, ["generate", *common, "--prompts", str(prompts),
                                    "--out", str(tmp_path / "out.jsonl")], folder)
    assert not (tmp_path / "out.jsonl").exists()


# ---- file modes ----------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield 0o666 & ~0o022
    finally:
        os.umask(old)


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def test_saved_model_files_get_the_umask_mode(tmp_path, umask_022):
    model = GPT(config_for("gpt2-test", POSITIONS, vocab_size=1000))
    folder = save_hf_dir(model, tmp_path / "final")
    assert modes(folder) == {"config.json": umask_022, "model.safetensors": umask_022}
    assert load_hf_dir(folder).config.n_embd == 64  # and it still loads


def test_checkpoint_files_get_the_umask_mode(tmp_path, umask_022):
    model = GPT(config_for("gpt2-test", POSITIONS, vocab_size=1000))
    folder = save_training_checkpoint(tmp_path / "state", 7, lambda f: write_hf_files(model, f),
                                      {"step": 7}, {"lr": 1e-3}, keep=2)
    found = modes(folder)
    assert set(found) == {"config.json", "model.safetensors", "training_state.pt", "train_config.json"}
    assert set(found.values()) == {umask_022}, found


def test_a_stricter_umask_is_followed_too(tmp_path):
    old = os.umask(0o077)
    try:
        folder = save_hf_dir(GPT(config_for("gpt2-test", POSITIONS, vocab_size=1000)), tmp_path / "final")
    finally:
        os.umask(old)
    assert set(modes(folder).values()) == {0o600}


def test_resuming_a_checkpoint_of_another_model_is_one_clear_message(tmp_path):
    """A state dir holding a checkpoint of a different model (here: another max_len) is refused by
    name, before any weights are loaded, instead of load_state_dict's traceback."""
    from gpt2ipu.train.config import TrainConfig
    from gpt2ipu.train.loop import train

    settings = dict(model="gpt2-test", dataset="generated", generated_samples=16, batch_size=2, max_steps=2,
                    checkpoint_every=1, state_dir=str(tmp_path / "state"), progress=False, eval_batches=1)
    train(TrainConfig(max_len=16, **settings))
    kept = sorted((tmp_path / "state" / "checkpoints").iterdir())
    with pytest.raises(UserError, match="another model") as caught:
        train(TrainConfig(max_len=32, **{**settings, "max_steps": 4}))
    message = str(caught.value)
    assert str(kept[-1]) in message and "n_positions 16 there, 32 here" in message
    assert "--resume-training-from-checkpoint none" in message
    assert sorted((tmp_path / "state" / "checkpoints").iterdir()) == kept   # nothing written or removed


# ----------------------------------------------------------------------------------------------
# n_head changes no tensor shape (issue 19): the architecture recorded in model.safetensors


def test_a_head_count_edited_in_config_json_is_refused(saved_model, tmp_path):
    folder = edited_copy(saved_model, tmp_path, n_head=4)   # 64 / 4: divisible, every shape the same
    with pytest.raises(UserError) as err:
        load_hf_dir(folder)
    message = str(err.value)
    assert str(folder) in message and "n_head 4 where the weights were saved with n_head 2" in message
    assert '"n_head": 2' in message and "config.json" in message


def test_the_record_is_the_saved_models_own(saved_model):
    from safetensors import safe_open

    with safe_open(str(saved_model / "model.safetensors"), framework="pt") as weights:
        record = json.loads(weights.metadata()["gpt2ipu_architecture"])
    assert record == {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": POSITIONS, "vocab_size": VOCAB}
    assert load_hf_dir(saved_model).config.n_head == 2


def test_a_folder_without_the_record_loads_as_before_and_is_still_checked(saved_model, tmp_path):
    """transformers' or the hub's files have no record: a legitimate custom size (6 heads of 64)
    loads; a head count that does not divide n_embd is refused; another one cannot be told."""
    torch.manual_seed(0)
    folder = tmp_path / "custom"
    save_hf_dir(GPT(config_for("gpt2-test", POSITIONS, vocab_size=VOCAB, n_layer=1, n_embd=384, n_head=6)), folder)
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})   # as save_pretrained writes it
    assert load_hf_dir(folder).config.n_head == 6
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_head": 5}))
    with pytest.raises(UserError, match=r"config\.json: n_embd \(384\) must be a multiple of n_head \(5\)"):
        load_hf_dir(folder)
    (folder / "config.json").write_text(json.dumps({**config, "n_head": 4}))
    assert load_hf_dir(folder).config.n_head == 4   # nothing to check it against: loads, as documented
