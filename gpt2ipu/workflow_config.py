"""The workflow's run configuration (config/config.yaml): its schema check, with messages that name the key.

Snakemake's own `validate` reports the whole schema path; users need the dotted key, the bad
value and what is allowed, so the workflow calls `validate_config` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jsonschema
import yaml

from gpt2ipu.errors import UserError


def load_schema(schema_path: str | os.PathLike) -> dict:
    with open(schema_path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def coerce_command_line_strings(config: dict, schema: Mapping[str, Any]) -> None:
    """Turn strings into the numbers/booleans/nulls the schema asks for, in place.

    Snakemake parses nested `--config key={a: 1}` values with YAML's BaseLoader, which leaves every
    scalar a string ('1', 'false'); a top-level `--config key=1` is typed. This makes both mean
    the same, without accepting anything the schema would not.
    """
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    for key, value in list(config.items()):
        sub = properties.get(key, extra if isinstance(extra, Mapping) else None)
        if sub is None:
            continue
        if isinstance(value, dict):
            coerce_command_line_strings(value, sub)
            continue
        wanted = sub.get("type")
        wanted = [wanted] if isinstance(wanted, str) else (wanted or [])
        if not isinstance(value, str) or "string" in wanted:
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        if any(isinstance(parsed, _TYPES[t]) and not (t != "boolean" and isinstance(parsed, bool))
               for t in wanted if t in _TYPES):
            config[key] = parsed


def validate_config(config: Mapping[str, Any], schema_path: str | os.PathLike) -> None:
    """Raise UserError for the first problem (sorted by key), naming the key and what is allowed.

    Strings from the command line that stand for numbers or booleans are converted first (in place).
    """
    schema = load_schema(schema_path)
    if isinstance(config, dict):
        coerce_command_line_strings(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    err = errors[0]
    key = _dotted(err.absolute_path)
    if err.validator == "additionalProperties":
        message = f"config: {err.message} (under key '{key}'); check the spelling against config/config.yaml"
    elif err.validator == "enum":
        message = f"config key '{key}': {err.instance!r} is not one of {err.validator_value}"
    elif err.validator == "type":
        message = f"config key '{key}': {err.instance!r} is not of type {err.validator_value}"
    else:
        message = f"config key '{key}': {err.message}"
    more = f" ({len(errors) - 1} more problem(s) after this one)" if len(errors) > 1 else ""
    raise UserError(f"{message}{more}. Fix it in config/config.yaml or in --config.")


# train.recipe: auto -> the recipe of each dataset: a short run for the embedded sample and for the
# user's own files (whose size is unknown: pick `web` or `enwiki` for a real run), llm.c's GPT-2
# recipe for a Hub dataset (web text such as FineWeb), the original's for Wikipedia.
AUTO_RECIPES = {"sample": "sample", "text": "sample", "hf": "web", "enwiki": "enwiki", "local": "enwiki"}


def active_recipe_name(config: Mapping[str, Any]) -> str:
    name = config["train"]["recipe"]
    if name == "auto":
        name = AUTO_RECIPES[config["dataset"]]
    if name not in config["train"]["recipes"]:
        raise UserError(
            f"config key 'train.recipe': {name!r} is not one of the recipes {sorted(config['train']['recipes'])}"
        )
    return name


def shard_max_len(config: Mapping[str, Any]) -> int:
    """Tokens per sample: `shards.max_len`, else the active training recipe's `max_len`."""
    if config["shards"]["max_len"] is not None:
        return int(config["shards"]["max_len"])
    return int(config["train"]["recipes"][active_recipe_name(config)]["max_len"])
