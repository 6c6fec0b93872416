"""The library's layers, as declared in pyproject.toml's import-linter contracts, hold; and they can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


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
