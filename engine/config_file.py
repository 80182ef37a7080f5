"""`--config args.yaml` (serve, bench): a YAML file of a command's arguments, put before its command line so that
the command line's flags win (argparse keeps the last value given), as vLLM's --config."""
from __future__ import annotations

import argparse
import json
from typing import Any

from cogvlm2.errors import InputError

CONFIG_FILE_DEST = "args_config"


def add_config_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest=CONFIG_FILE_DEST, default=None, metavar="YAML",
                        help="YAML file of these arguments (keys: flag names, with - or _), applied before the "
                             "command line, whose flags win")


def config_file_tokens(parser: argparse.ArgumentParser, path: str, skip: set[str]) -> list[str]:
    """The YAML's arguments as command-line tokens of `parser`'s flags, one `--flag=value` token each (a token that
    cannot swallow a positional that follows it)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--config {path}: {e}") from e
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a mapping of argument names to values")
    tokens: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None:
            raise InputError(f"--config {path}: unknown argument {key!r} (not a flag of this command)")
        if action.dest == CONFIG_FILE_DEST:
            raise InputError(f"--config {path}: a config file cannot name another one ({key!r})")
        if action.dest in skip or value is None:
            continue
        tokens += _tokens_for(action, flag, value, f"--config {path}: {key!r}")
    return tokens


def _tokens_for(action: argparse.Action, flag: str, value: Any, where: str) -> list[str]:
    if action.nargs == 0:  # a switch: store_true / store_false / --x and --no-x
        if not isinstance(value, bool):
            raise InputError(f"{where} is a switch: give true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):  # option_strings: --x, --no-x
            positive, negative = action.option_strings[0], "--no-" + action.option_strings[0][2:]
            return [positive if value == (flag == positive) else negative]
        return [flag] if value else []
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return [f"{flag}={text}"]
