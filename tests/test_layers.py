"""The library's layers, as declared in pyproject.toml's import-linter contracts, hold; and they can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e "
                                                                  "'.[test]')")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy in `root`, not the installed package, is what gets analysed.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_the_layers_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, upward_import", [
    ("gpt2ipu/model/memory.py", "import gpt2ipu.train.loop"),         # the model reaching up into training
    ("gpt2ipu/model/memory.py", "import gpt2ipu.model.gpt"),          # a cycle inside the model package
    ("gpt2ipu/generate/sampling.py", "import gpt2ipu.evaluate.wiki"),  # two independent siblings
    ("gpt2ipu/bench/suite.py", "import gpt2ipu.bench.cli"),           # the cycle bench once had
])
@pytest.mark.slow
def test_an_upward_import_breaks_a_contract(tmp_path, module, upward_import):
    shutil.copytree(REPO / "gpt2ipu", tmp_path / "gpt2ipu", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a", encoding="utf-8") as source:
        source.write(f"\n{upward_import}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and upward_import.split()[-1] in result.stdout


def test_every_package_has_a_contract():
    """The README says every package keeps its own layers: each package of gpt2ipu (a folder with an
    __init__.py) is a container of a layers contract, or its modules are in an independence one."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = pyproject["tool"]["importlinter"]["contracts"]
    covered = {"gpt2ipu"} | {c for contract in contracts for c in contract.get("containers", [])}
    covered |= {m.rsplit(".", 1)[0] for contract in contracts if contract["type"] == "independence"
                for m in contract["modules"]}
    packages = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "gpt2ipu").rglob("__init__.py")}
    assert sorted(packages - covered) == []


def test_the_workflow_config_check_and_the_training_config_have_different_names():
    """Issue 19: `gpt2ipu.config` (the workflow config's schema check) beside `gpt2ipu.train.config`
    (TrainConfig) were two modules called config; the first is now `gpt2ipu.workflow_config`."""
    named_config = sorted(str(p.relative_to(REPO)) for p in (REPO / "gpt2ipu").rglob("config.py"))
    assert named_config == ["gpt2ipu/train/config.py"]
    from gpt2ipu.workflow_config import validate_config

    assert callable(validate_config)
