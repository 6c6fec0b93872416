"""Issue 13, items 2, 6 and 8: configurations and inputs that used to fail late or with untrue advice.

2: shards.valid_fraction 0 trains without validation; 6: a recipe key typo fails when the workflow
starts; 8: plain XML named .bz2, a one-article dump, a prompts file that is not UTF-8.
"""

import bz2
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpt2ipu.data import extract
from gpt2ipu.data import shards as shards_stage
from gpt2ipu.data.formats.megatron import MMapWriter
from gpt2ipu.errors import UserError
from gpt2ipu.generate.batch import read_prompts
from gpt2ipu.train.config import TrainConfig, check_recipes

REPO = Path(__file__).resolve().parents[1]
MINI = Path(__file__).parent / "data" / "extract" / "mini.xml"
EOS = 50256


def make_token_part(folder: Path, docs) -> Path:
    with MMapWriter(folder / "tokens", np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return folder


def random_documents(n, seed=0):
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.integers(0, 1000, size=int(rng.integers(20, 80))), [EOS]]).astype(np.uint16)
            for _ in range(n)]


# ----------------------------------------------------------------------------- item 2: valid_fraction 0

@pytest.mark.parametrize("dataset", ["tfrecord", "mmap"])
def test_valid_fraction_zero_trains_without_validation(tmp_path, capsys, dataset):
    from gpt2ipu.train.loop import train

    part = make_token_part(tmp_path / "tokens", random_documents(40))
    shards_dir = tmp_path / "shards"
    stats = shards_stage.shards([part], shards_dir, max_len=16, valid_fraction=0.0, seed=0, samples_per_shard=50)
    assert stats["valid_samples"] == 0 and not list(shards_dir.glob("valid*"))
    capsys.readouterr()

    result = train(TrainConfig(model="gpt2-test", dataset=dataset, shards_dir=str(shards_dir), max_len=16,
                               batch_size=2, max_steps=3, eval_every=1, checkpoint_every=0, device="cpu",
                               state_dir=str(tmp_path / "state"), save_model_path=str(tmp_path / "final"),
                               progress=False, seed=1))
    err = capsys.readouterr().err
    assert err.count("no validation split (shards.valid_fraction 0): training without validation") == 1
    assert result["steps"] == 3 and "valid_loss" not in result
    records = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any("valid_loss" in r or "valid_ppl" in r for r in records)
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "state" / "loss.png").is_file()
    # nothing half-written left behind: no temporary files or folders next to the outputs
    leftovers = [p for p in (*tmp_path.iterdir(), *(tmp_path / "state").iterdir()) if p.name.startswith(".")]
    assert leftovers == []


def test_shards_with_a_valid_split_still_need_it(tmp_path):
    """Only stats.json's valid_fraction 0 means "no validation": valid shards gone missing still fail."""
    from gpt2ipu.train.loop import has_valid_split

    part = make_token_part(tmp_path / "tokens", random_documents(40))
    shards_stage.shards([part], tmp_path / "s", max_len=16, valid_fraction=0.2, seed=0, samples_per_shard=50)
    assert has_valid_split(TrainConfig(dataset="tfrecord", shards_dir=str(tmp_path / "s")))
    shards_stage.shards([part], tmp_path / "n", max_len=16, valid_fraction=0.0, seed=0, samples_per_shard=50)
    assert not has_valid_split(TrainConfig(dataset="tfrecord", shards_dir=str(tmp_path / "n")))
    assert has_valid_split(TrainConfig(dataset="generated"))


# ----------------------------------------------------------------------------- item 6: recipe keys

def sample_recipe():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return config["train"]["recipes"]


def test_shipped_recipes_pass():
    check_recipes(sample_recipe())


def test_recipe_key_typo_names_the_key_and_the_close_match():
    recipes = sample_recipe()
    recipes["sample"]["learning_rat"] = 0.001
    with pytest.raises(UserError) as info:
        check_recipes(recipes)
    message = str(info.value)
    assert "config key 'train.recipes.sample'" in message and "'learning_rat'" in message
    assert "did you mean 'learning_rate'" in message


def test_recipe_wrong_type_is_refused():
    recipes = sample_recipe()
    recipes["sample"]["eval_every"] = "often"
    with pytest.raises(UserError, match=r"train\.recipes\.sample.*'eval_every' must be int, got 'often'"):
        check_recipes(recipes)
    recipes = sample_recipe()
    recipes["sample"]["lr_schedule"] = "cosin"
    with pytest.raises(UserError, match=r"train\.recipes\.sample.*'lr_schedule'"):
        check_recipes(recipes)


@pytest.mark.slow
def test_recipe_typo_fails_when_the_workflow_starts(tmp_path):
    for name in ("Snakefile", "workflow", "config", "profiles", "environment.yml"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    config = yaml.safe_load((tmp_path / "config" / "config.yaml").read_text())
    config["train"]["recipes"]["sample"]["learning_rat"] = 0.001
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "pretrain_small"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "train.recipes.sample" in output and "learning_rat" in output and "learning_rate" in output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- item 8: messages

@pytest.mark.parametrize("suffix", [".xml.bz2", ".xml.gz"])
def test_plain_xml_named_compressed_says_rename(tmp_path, suffix):
    dump = tmp_path / f"dump{suffix}"
    shutil.copy(MINI, dump)
    with pytest.raises(UserError) as info:
        extract.extract(dump, tmp_path / "out", processes=1)
    message = str(info.value)
    assert f"{dump} is an uncompressed XML file named {Path(suffix).suffix}: rename it to dump.xml" in message
    assert "delete" not in message and not (tmp_path / "out").exists()


def test_truncated_dump_does_not_say_delete(tmp_path):
    whole = bz2.compress(MINI.read_bytes())
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as info:
        extract.extract(cut, tmp_path / "out", processes=1)
    assert "truncated or corrupt" in str(info.value) and "delete" not in str(info.value)


def test_one_document_cannot_be_split(tmp_path):
    part = make_token_part(tmp_path / "tokens", random_documents(1))
    with pytest.raises(UserError) as info:
        shards_stage.shards([part], tmp_path / "out", max_len=8, valid_fraction=0.01, seed=0, samples_per_shard=10)
    message = str(info.value)
    assert "1 document(s): too few to split into train and valid" in message
    assert "shards.valid_fraction 0" in message and "extract.min_chars" in message
    assert "raise valid_fraction" not in message and not (tmp_path / "out").exists()
    stats = shards_stage.shards([part], tmp_path / "out", max_len=8, valid_fraction=0.0, seed=0, samples_per_shard=10)
    assert stats["train_documents"] == 1


def test_prompts_not_utf8_names_file_and_byte(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("first prompt\nCaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError) as info:
        read_prompts(prompts)
    message = str(info.value)
    assert str(prompts) in message and "not UTF-8" in message and "byte offset 16" in message and "line 2" in message
    prompts.write_text("first prompt\nCaf\u00e9 au lait\n", encoding="utf-8")
    assert read_prompts(prompts) == ["first prompt", "Caf\u00e9 au lait"]


def test_the_workflow_config_check_names_the_key(tmp_path):
    from gpt2ipu.workflow_config import validate_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate_config(config, REPO / "config" / "schema.yaml")
    config["evaluate"]["batch_size"] = 0
    with pytest.raises(UserError, match=r"config key 'evaluate\.batch_size'"):
        validate_config(config, REPO / "config" / "schema.yaml")
