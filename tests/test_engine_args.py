"""EngineArgs is the one list of engine settings: the CLI flags and LLM's keyword arguments derive from it."""
from __future__ import annotations

import dataclasses

import pytest

from engine.cli import build_parser
from engine.config import EngineArgs, engine_kwargs, flag_of


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli", True)]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_setting_has_a_flag_with_help_and_the_same_default(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    actions = {a.dest: a for a in sub._actions}
    for f in _cli_fields():
        action = actions[f.name]
        assert flag_of(f) in action.option_strings
        assert action.help and action.default == f.default, f.name


def test_parsed_flags_become_engine_args():
    args = build_parser().parse_args(["generate", "--prompt", "Hi", "--block-size", "8", "--no-enable-prefix-caching",
                                      "--kernels", "reference", "--kv-cache-memory-gb", "0.5", "--engine-seed", "3"])
    kwargs = engine_kwargs(args)
    assert set(kwargs) == {f.name for f in _cli_fields()} - {"model"}
    engine_args = EngineArgs(model=args.model, **kwargs)
    assert (engine_args.block_size, engine_args.enable_prefix_caching, engine_args.kernels,
            engine_args.kv_cache_memory_gb, engine_args.seed) == (8, False, "reference", 0.5, 3)


@pytest.mark.parametrize("bad, field", [({"block_size": 0}, "block_size"), ({"max_num_seqs": True}, "max_num_seqs"),
                                        ({"kernels": "gpu"}, "kernels"), ({"max_model_len": 1}, "max_model_len"),
                                        ({"mm_encoder_tp_mode": "x"}, "mm_encoder_tp_mode"),
                                        ({"num_kv_blocks": 0}, "num_kv_blocks")])
def test_bad_settings_name_their_field(bad, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**bad)


def test_unknown_llm_keyword_is_a_type_error_naming_it():
    from engine import LLM
    with pytest.raises(TypeError, match="no_such_setting"):
        LLM("demo", no_such_setting=1)
