"""Typed configs: YAML inheritance, presets, overrides, hashing and one-line errors."""

import pytest
import torch
from pydantic import ValidationError

from blueberry.config import RunConfig, load_config, parse_count, parse_duration, preset_names
from blueberry.errors import ConfigError
from blueberry.registry import MLPS, Registry


@pytest.mark.parametrize(
    "text,seconds", [("2m24s", 144), ("144s", 144), (90, 90), ("90", 90), ("1h", 3600), ("1.5m", 90)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text,n",
    [("5M", 5_000_000), ("1.5B", 1_500_000_000), (1000, 1000), ("100k", 100_000), ("2e6", 2_000_000)],
)
def test_counts(text, n):
    assert parse_count(text) == n


@pytest.mark.parametrize("bad", ["abc", "2x", "", True])
def test_bad_duration(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_presets_all_load():
    assert {"blueberry-seed", "gpt2-baseline", "blueberry-1b", "tiny"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(data={"preset": name}), RunConfig)


def test_base_inheritance_relative_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("preset: tiny\nmodel: {n_layers: 3}\nbudget: {time: 2m24s}\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: ../base.yaml\nmodel: {qk_norm: false}\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", overrides=["model.d_model=64", "budget.tokens=5M"])
    assert cfg.model.n_layers == 3 and cfg.model.qk_norm is False and cfg.model.d_model == 64
    assert cfg.model.n_heads == 4  # from the tiny preset
    assert cfg.budget.time == 144 and cfg.budget.tokens == 5_000_000


def test_configs_are_frozen():
    cfg = load_config(data={"preset": "tiny"})
    with pytest.raises(ValidationError):
        cfg.model.n_layers = 3  # type: ignore[misc]


def test_config_hash_is_stable_and_ignores_seed():
    a = load_config(data={"preset": "tiny"})
    b = load_config(data={"preset": "tiny"}, overrides=["train.seed=7"])
    c = load_config(data={"preset": "tiny"}, overrides=["model.qk_norm=false"])
    assert a.config_hash == b.config_hash != c.config_hash
    assert a.config_hash == load_config(data={"preset": "tiny"}).config_hash
    assert len(a.config_hash) == 16


def _err(tmp_path, text, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides=overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_is_named(tmp_path):
    msg = _err(tmp_path, "model: {n_layerz: 3}\n")
    assert "model.n_layerz" in msg and "unknown key" in msg and "n_layers" in msg


def test_unknown_component_lists_registered_names(tmp_path):
    msg = _err(tmp_path, "model: {norm: batchnorm}\n")
    assert "model.norm" in msg and "batchnorm" in msg and "layernorm" in msg and "rmsnorm" in msg


def test_wrong_type_is_named(tmp_path):
    msg = _err(tmp_path, "model: {n_layers: many}\n")
    assert "model.n_layers" in msg and "many" in msg


def test_shape_errors(tmp_path):
    assert "n_kv_heads" in _err(tmp_path, "model: {n_heads: 8, n_kv_heads: 3}\n")
    assert "divisible by n_heads" in _err(tmp_path, "model: {d_model: 100, n_heads: 8}\n")
    assert "even head_dim" in _err(tmp_path, "model: {d_model: 36, n_heads: 4, n_kv_heads: 2}\n")


def test_budget_errors(tmp_path):
    assert "budget.time must be positive" in _err(tmp_path, "budget: {time: 0}\n")
    assert "at least one of budget" in _err(tmp_path, "budget: {}\n")


def test_base_errors(tmp_path):
    assert "file not found" in _err(tmp_path, "base: nothere.yaml\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    assert "unknown preset" in _err(tmp_path, "preset: nope\n")


def test_malformed_yaml(tmp_path):
    assert "malformed YAML" in _err(tmp_path, "model: {n_layers: [\n")


def test_set_unknown_path(tmp_path):
    msg = _err(tmp_path, "preset: tiny\n", overrides=["model.nope=1"])
    assert "--set model.nope" in msg
    assert "KEY=VALUE" in _err(tmp_path, "preset: tiny\n", overrides=["model.qk_norm"])


def test_set_values_parse_as_yaml(tmp_path):
    cfg = load_config(
        data={"preset": "tiny"},
        overrides=["model.qk_norm=false", "model.logit_softcap=null", "budget.time=2m"],
    )
    assert cfg.model.qk_norm is False and cfg.model.logit_softcap is None and cfg.budget.time == 120


def test_plugin_registers_a_new_mlp(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "preset: tiny\nplugins: [tests.plugins.my_mlp]\nmodel: {mlp: squared_silu, vocab_size: 4096}\n"
    )
    cfg = load_config(p)
    assert "squared_silu" in MLPS.names()
    from blueberry import build_model

    model = build_model(cfg.model)
    loss = model(torch.randint(0, 4096, (1, 8)), torch.randint(0, 4096, (1, 8)))[1]
    assert torch.isfinite(loss)


def test_plugin_that_does_not_import(tmp_path):
    msg = _err(tmp_path, "plugins: [no_such_module_xyz]\n")
    assert "plugins" in msg and "no_such_module_xyz" in msg


def test_registry_get_lists_choices():
    reg = Registry("thing.kind")
    reg.register("a")(object)
    with pytest.raises(ConfigError, match="registered: a"):
        reg.get("b")
