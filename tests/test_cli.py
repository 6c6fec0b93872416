"""The `gpt2ipu` command: every flag of every subcommand says what it does."""

import argparse
import importlib

import pytest

from gpt2ipu.cli import COMMANDS


def flags_without_help(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:   # argparse has no public accessor for a parser's arguments
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                missing += flags_without_help(subparser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_a_help_line(command):
    parser = argparse.ArgumentParser(prog=f"gpt2ipu {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    assert flags_without_help(parser, command) == []


def test_every_benchmark_flag_has_a_help_line():
    from gpt2ipu.bench.common import STAGES

    missing = []
    for stage, module_name in sorted(STAGES.items()):
        parser = argparse.ArgumentParser(prog=f"gpt2ipu bench {stage}")
        importlib.import_module(module_name).add_arguments(parser)
        missing += flags_without_help(parser, f"bench {stage}")
    assert missing == []
