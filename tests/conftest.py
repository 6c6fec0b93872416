import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2IPU_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_file():
    """Path to a real data file under ../shared/data, or skip the test when it is absent."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"real data file {path} is absent (only the project's workplace has it)")
        return path

    return get


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: on 2 shared cores, one thread beats two that contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> Path:
    """A random-weight gpt2-test model saved in the Hugging Face layout, with the test module's
    WINDOW as its context (seeded: the same weights every time)."""
    import torch

    from gpt2ipu.model.hf import save_hf_dir
    from gpt2ipu.model import GPT, config_for

    torch.manual_seed(0)
    return save_hf_dir(GPT(config_for("gpt2-test", request.module.WINDOW)), tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def model(model_dir):
    """That model loaded back for evaluation and generation (CPU, fp32)."""
    from gpt2ipu.pretrained import load_model

    return load_model(model_dir, "cpu", "fp32")
