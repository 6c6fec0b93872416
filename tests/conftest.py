import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2IPU_SHARED_DATA", REPO.parent / "shared" / "data"))

# Session fixtures that compile the custom ops (tests/test_ops.py): a test that uses one, even
# through another fixture, is `slow` without saying so itself.
COMPILING_FIXTURES = {"built_ops_dir"}


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if COMPILING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def built_ops_dir(request, tmp_path_factory):
    from gpt2ipu import ops

    key = ops.build_key(REPO / "custom_ops")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir(f"gpt2ipu-ops-{key}") if cache is not None else tmp_path_factory.mktemp("ops")
    status = ops.build_ops(REPO / "custom_ops", folder)
    return folder, status


@pytest.fixture
def compiled(built_ops_dir):
    """The loaded ops namespace (skips when the build failed on this machine)."""
    from gpt2ipu import ops

    folder, status = built_ops_dir
    if not status["built"]:
        pytest.skip(f"the custom ops did not build here: {status['reason']}")
    namespace = ops.load_ops(folder, quiet=True)
    assert namespace is not None, ops.ops_reason(folder)
    return namespace


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

    from gpt2ipu.model import GPT, config_for
    from gpt2ipu.model.hf import save_hf_dir

    torch.manual_seed(1)   # weights that get some LAMBADA words right and some wrong (test_evaluate)
    return save_hf_dir(GPT(config_for("gpt2-test", request.module.WINDOW)), tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def model(model_dir):
    """That model loaded back for evaluation and generation (CPU, fp32)."""
    from gpt2ipu.pretrained import load_model

    return load_model(model_dir, "cpu", "fp32")


# ---------------------------------------------------------------------------------------------
# Shared helpers: `from conftest import ...` (pytest puts tests/ on sys.path, there being no
# tests/__init__.py), or the fixtures by name.


def plain_loss(hidden, weight, labels):
    """The LM loss through PyTorch's own linear + cross_entropy (labels -100 ignored): the reference
    of the chunked and fused losses."""
    import torch.nn.functional as F  # here: torch is slow to import, and not every test needs it

    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100)


def wikiextractor_articles(dump: Path, out: Path, processes: int = 1) -> list[dict]:
    """`dump` run through wikiextractor's own command line as the extract stage does (--json
    --no-templates), in a child process: the articles it writes under `out`, in file order."""
    subprocess.run([sys.executable, "-m", "wikiextractor.WikiExtractor", "--json", "--no-templates", "--quiet",
                    "--processes", str(processes), "-o", str(out), str(dump)],
                   check=True, capture_output=True, timeout=300)
    return [json.loads(line) for f in sorted(Path(out).rglob("wiki_*")) for line in f.open(encoding="utf-8")]


class RangeServer(ThreadingHTTPServer):
    """A local HTTP server of `files` ({path: bytes}) that logs each request in `requests`
    ({"path", "range", "status", "sent"}). Switches: `ignore_range` (answer 200 with the whole body),
    `truncate_first` (send a third of the next body, then close: a dropped download)."""

    daemon_threads = True

    def reset(self, files: dict[str, bytes]) -> None:
        """Serve `files` from now on, with the switches off and an empty request log."""
        self.files = files
        self.ignore_range = False
        self.truncate_first = False
        self.requests: list[dict] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"

    @property
    def ranges(self) -> list:
        """The Range header of each request (None where there was none), in order."""
        return [r["range"] for r in self.requests]


class RangeHandler(BaseHTTPRequestHandler):
    """Serves `server.files`, honouring `Range: bytes=N-` (206, or 416 past the end) unless told not
    to, and logs requests."""

    def do_GET(self):
        server: RangeServer = self.server
        body = server.files.get(self.path)
        record = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
        server.requests.append(record)
        if body is None:
            record["status"] = 404
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and not server.ignore_range else 0
        if match and not server.ignore_range:
            if start >= len(body):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            record["status"] = 206
        else:
            self.send_response(200)
            record["status"] = 200
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if server.truncate_first:
            server.truncate_first = False
            chunk = chunk[: len(chunk) // 3]   # then the connection closes: a dropped download
        record["sent"] = len(chunk)   # before writing: the client may be done before this thread resumes
        self.wfile.write(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def range_server():
    """A `RangeServer` running for the test module; tests `reset` it with the files they serve."""
    server = RangeServer(("127.0.0.1", 0), RangeHandler)
    server.reset({})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def save_tiny_hf_gpt2(folder: Path, seed: int, n_positions: int) -> Path:
    """A 2-layer x 64 transformers GPT-2 with random weights and GPT-2's tokenizer, saved in `folder`:
    the model the lm-eval comparisons run both evaluators on."""
    import torch
    import transformers

    from gpt2ipu.data.tokenizer import hf_gpt2_tokenizer_fast

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=n_positions)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    hf_gpt2_tokenizer_fast().save_pretrained(folder)
    return folder
