"""Messages go through one logger per package to the stderr of the moment, at the chosen level,
with the rank in multi-process runs."""

import contextlib
import io
import logging

import pytest

from gpt2ipu.cli import main as cli_main
from gpt2ipu.errors import UserError
from gpt2ipu.log import package_logger, setup_logging


@pytest.fixture(autouse=True)
def restore_level():
    root = logging.getLogger("gpt2ipu")
    level = root.level
    yield
    root.setLevel(level)


def test_one_logger_per_package_writing_to_the_current_stderr(monkeypatch):
    log = package_logger("gpt2ipu.data.shards")
    assert log is package_logger("gpt2ipu.data.tokenize") and log.name == "gpt2ipu.data"
    setup_logging("info")
    redirected = io.StringIO()
    with contextlib.redirect_stderr(redirected):  # as workflow_adapter.run_stage does for a rule's log
        log.info("into the rule's log")
    assert redirected.getvalue() == "into the rule's log\n"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    redirected = io.StringIO()
    with contextlib.redirect_stderr(redirected):
        log.info("from one rank")
    assert redirected.getvalue() == "[rank 3] from one rank\n"


def test_the_level_filters_and_a_bad_level_is_refused(capsys, monkeypatch, tmp_path):
    log = package_logger("gpt2ipu.ops.build")
    setup_logging("warning")
    log.info("hidden")
    log.warning("shown")
    assert capsys.readouterr().err == "shown\n"
    with pytest.raises(UserError, match="log level 'loud'"):
        setup_logging("loud")
    monkeypatch.setenv("GPT2IPU_LOG_LEVEL", "noisy")
    assert cli_main(["dump", "sample-text", "--out", str(tmp_path / "a.jsonl"), "--documents", "2"]) == 2
    assert "GPT2IPU_LOG_LEVEL" in capsys.readouterr().err
    monkeypatch.delenv("GPT2IPU_LOG_LEVEL")
    assert cli_main(["--log-level", "error", "shards", "--tokens", str(tmp_path / "none"), "--out-dir",
                     str(tmp_path / "s")]) == 2   # the flag before the command is not taken for it
