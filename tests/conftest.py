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
