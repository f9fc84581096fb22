"""One source of defaults: dataclass defaults, replaced by the preset's recipe, replaced by a flag."""

import dataclasses

import pytest

from megatron_emu.arguments import COMPOSITE, FIELDS, build_parser, parse_args
from megatron_emu.config import (
    INSTRUCT_RECIPES, PRESETS, RECIPES, CheckpointConfig, FailsafeConfig, OptimizerConfig, TrainConfig, recipe_config,
    with_fields,
)
from megatron_emu.logging_args import LOGGING_FIELDS


def get(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def field_paths(config) -> set[str]:
    paths = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and f.name != "model":
            paths |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)}
        else:
            paths.add(f.name)
    return paths


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_flags_is_the_recipe(preset):
    assert parse_args(["--preset", preset]) == recipe_config(preset)
    instruct = parse_args(["--preset", preset, "--lora-rank", "16"])
    assert instruct == with_fields(recipe_config(preset, instruct=True), {"lora.rank": 16})


def test_recipes_name_config_fields_and_only_change_what_they_say():
    paths = field_paths(TrainConfig())
    for recipes in (RECIPES, INSTRUCT_RECIPES):
        for preset, recipe in recipes.items():
            assert set(recipe) <= paths, f"{preset}: {set(recipe) - paths} are not TrainConfig fields"
    tiny, default = recipe_config("tiny"), TrainConfig()
    changed = {p for p in field_paths(default) if p != "model" and get(tiny, p) != get(default, p)}
    assert changed == {p for p, v in RECIPES["tiny"].items() if get(default, p) != v}


def test_every_flag_sets_one_field_and_has_no_default_of_its_own():
    parser = build_parser()
    paths = field_paths(TrainConfig())
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert set(FIELDS.values()) <= paths
    assert dests == set(FIELDS) | COMPOSITE | set(LOGGING_FIELDS), dests ^ (set(FIELDS) | COMPOSITE | set(LOGGING_FIELDS))
    with_default = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "preset") and a.default is not None}
    assert not with_default, f"flags with a default of their own (a second source): {with_default}"


def test_a_flag_given_wins_over_recipe_and_dataclass():
    config = parse_args(["--preset", "emu-14b", "--prefetch-factor", "4", "--num-workers", "0", "--lr", "1e-4"])
    assert (config.data.prefetch_factor, config.data.num_workers, config.optimizer.lr) == (4, 0, 1e-4)
    assert config.optimizer.lr_vision == RECIPES["emu-14b"]["optimizer.lr_vision"]  # the recipe's
    assert config.optimizer.adam_beta2 == OptimizerConfig().adam_beta2  # the dataclass's


@pytest.mark.parametrize("make, message", [
    (lambda: CheckpointConfig(save_threads=0), "--ckpt-save-threads >= 1"),
    (lambda: FailsafeConfig(exit_signal="TERM"), "--exit-signal 'TERM' is not a signal name"),
    (lambda: OptimizerConfig(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True),
     "mutually exclusive"),
])
def test_the_dataclasses_check_their_own_values(make, message):
    """Built from flags or in code, a bad value fails the same way."""
    with pytest.raises(ValueError, match=message):
        make()
