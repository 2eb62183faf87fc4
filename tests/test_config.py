"""Configs: every recipe validates; a wrong key, a bad value or a missing data path fails at once, clearly."""

import importlib
import os
import pkgutil

import pytest
from conftest import REPO, run_script, tiny_config

import configs
from configs import base, tiny_es
from llm import config_validation
from llm.model import pooling
from llm.model.transformer import REMAT_POLICIES
from llm.runs import directory
from llm.runs.build import TRAINABLE
from llm.train import inputs, losses, optimizer

RECIPES = sorted(module.name for module in pkgutil.iter_modules(configs.__path__) if not module.ispkg)


def test_every_recipe_is_listed():
    assert {"base", "tiny_es", "sft_es", "lora_es", "qlora_es", "prompt_tuning_sentiment_es", "dpo_es"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_are_valid(name, tmp_path):
    module = importlib.import_module(f"configs.{name}")
    if name == "from_run":  # Its argument is a run directory, whose model it takes.
        run = tiny_es.get_config()
        run.model.lora_targets = "mlp/up"
        directory.write_run_files(str(tmp_path), run, None)
        config = module.get_config(str(tmp_path))
        assert config.model.to_dict() == run.model.to_dict() and config.init_from == str(tmp_path)
    else:
        config = module.get_config()
    config_validation.validate(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.norm", "batchnorm", r"config.model.norm='batchnorm' is not one of \('layernorm', 'rmsnorm'\)"),
        ("model.position_encoding", "alibi", r"not one of \('rope', 'learned', 'sinusoidal'\)"),
        ("model.num_kv_heads", 3, "num_kv_heads=3 must divide"),
        ("train.batch_size", 0, "config.train.batch_size=0 must be > 0"),
        ("optimizer.schedule", "step", r"config.optimizer.schedule='step' is not one of"),
        ("model.num_layers", "four", "config.model.num_layers='four' has type str; expected int"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key, value, message):
    config = tiny_config()
    section, name = key.split(".")
    with config[section].ignore_type():
        config[section][name] = value
    with pytest.raises(config_validation.ConfigError, match=message):
        config_validation.validate(config)


def test_unknown_key_in_a_recipe_is_rejected():
    config = tiny_config()
    config.model.num_layer = 3  # typo
    with pytest.raises(config_validation.ConfigError, match="Unknown config key config.model.num_layer"):
        config_validation.validate(config)


def test_missing_data_path_is_named():
    config = tiny_config()
    config.data.path = "/nonexistent/data"
    with pytest.raises(FileNotFoundError, match="config.data.path='/nonexistent/data' has no train/"):
        inputs.check_data_path(config)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.nm_layers=4", "nm_layers"),
        ("--config.model.norm=batchnorm", "config.model.norm='batchnorm' is not one of ('layernorm', 'rmsnorm')"),
        ("--config.data.path=/nonexistent/data", "config.data.path='/nonexistent/data' has no train/"),
        ("--config.data.path=", "config.data.path is empty"),
    ],
)
def test_command_line_errors_fail_before_any_work(flag, message, tmp_path):
    result = run_script("train.py", "--workdir=/tmp/unused", f"--config={REPO}/configs/tiny_es.py", flag)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Compiling" not in result.stderr and not os.path.exists("/tmp/unused")


@pytest.mark.parametrize(
    "key, cases",
    [
        ("train.objective", set(losses.OBJECTIVES)),
        ("train.trainable", set(TRAINABLE)),
        ("train.contrastive_pooling", set(pooling.POOLINGS)),
        ("optimizer.schedule", set(optimizer.SCHEDULES)),
        ("model.remat_policy", {"none", *REMAT_POLICIES}),  # "none" skips jax.checkpoint altogether
    ],
)
def test_each_dispatch_table_has_exactly_the_allowed_choices(key, cases):
    assert cases == set(base.CHOICES[key])


def test_a_config_difference_names_the_first_differing_key():
    saved = {"seed": 0, "model": {"num_layers": 2, "embed_dim": 32}}
    with pytest.raises(
        config_validation.ConfigError, match=r"^config.model.num_layers=4 differs from the run \(2\); x"
    ):
        config_validation.require_same(saved, {"seed": 0, "model": {"num_layers": 4, "embed_dim": 64}}, "the run", "x")
    with pytest.raises(config_validation.ConfigError, match=r"config.model.embed_dim=absent differs .* \(32\)"):
        config_validation.require_same(saved, {"seed": 0, "model": {"num_layers": 2}}, "the run", "x")
    config_validation.require_same(
        saved,
        {"seed": 0, "model": {"num_layers": 2, "embed_dim": 64}},
        "the run",
        "x",
        ignore=lambda key: key == "model.embed_dim",
    )
