"""Pattern notation round trips, and every bad input fails early with a message naming the
field, the value and what is allowed."""

from __future__ import annotations

import pytest

from hybrid.config import LayerSpec, ModelConfig, format_pattern, parse_pattern
from hybrid.layers import build
from hybrid.layers.attention import AttentionConfig
from hybrid.layers.mamba3 import Mamba3, Mamba3Config


@pytest.mark.parametrize("pattern", ["M-M-M-*-", "*-", "MMMM*", "M*-M*-", "-"])
def test_pattern_round_trips(pattern):
    config = ModelConfig.from_pattern(pattern, d_model=64, attention={"n_heads": 4})
    assert config.pattern == pattern
    assert (
        ModelConfig.from_layer_types(
            config.layer_types, d_model=64, attention={"n_heads": 4}
        ).pattern
        == pattern
    )
    assert format_pattern(parse_pattern(pattern)) == pattern
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_layer_types_and_attention_ratio_over_mixers():
    config = ModelConfig.from_pattern("M-M-M-*-", d_model=64, attention={"n_heads": 4})
    assert config.layer_types == ["mamba3", "swiglu"] * 3 + ["attention", "swiglu"]
    assert config.n_mixers == 4
    assert config.attention_ratio == 0.25


def test_per_layer_configs_survive_to_dict():
    layers = (
        LayerSpec("mamba3", Mamba3Config(d_state=32, mimo_rank=4)),
        LayerSpec("mamba3", Mamba3Config(d_state=64)),
        LayerSpec("attention", AttentionConfig(n_heads=2, rope=False)),
    )
    config = ModelConfig(d_model=128, layers=layers)
    assert config.pattern == "MM*"
    again = ModelConfig.from_dict(config.to_dict())
    assert again.layers[0].config.mimo_rank == 4 and again.layers[1].config.d_state == 64
    assert again.layers[2].config.rope is False
    edited = {**config.to_dict(), "pattern": "MMM"}  # a file whose pattern contradicts its layers
    with pytest.raises(ValueError, match="pattern='MMM' is invalid; allowed: 'MM\\*'"):
        ModelConfig.from_dict(edited)
    with pytest.raises(ValueError, match=r"attention\.rope='no' is invalid; allowed: true or"):
        ModelConfig.from_pattern("M*", d_model=128, attention={"n_heads": 2, "rope": "no"})


BAD = [
    # (kwargs for from_pattern, text the message must contain)
    ({"pattern": "M-X-"}, ["pattern='M-X-'", "'X'", "'M': 'mamba3'"]),
    ({"pattern": ""}, ["pattern=''", "non-empty"]),
    ({"mamba3": {"headdim": 48}}, ["mamba3.headdim=48", "d_inner = expand * d_model = 128"]),
    ({"mamba3": {"d_state": 15}}, ["mamba3.d_state=15", "even"]),
    ({"mamba3": {"mimo_rank": 0}}, ["mamba3.mimo_rank=0", ">= 1"]),
    ({"mamba3": {"ngroups": 3}}, ["mamba3.ngroups=3", "divisor of n_heads"]),
    ({"mamba3": {"rope_fraction": 0.25}}, ["mamba3.rope_fraction=0.25", "(0.5, 1.0)"]),
    ({"mamba3": {"a_activation": "exp"}}, ["mamba3.a_activation='exp'", "heavy_tail"]),
    ({"mamba3": {"chunk_size": 0}}, ["mamba3.chunk_size=0", "positive"]),
    ({"mamba3": {"d_stat": 64}}, ["mamba3.d_stat=64", "d_state"]),
    (
        {"attention": {"n_heads": 6, "n_kv_heads": 4}},
        ["attention.n_kv_heads=4", "divisor of attention.n_heads=6"],
    ),
    ({"attention": {"n_heads": 5}}, ["attention.n_heads=5", "divisor of d_model=64"]),
    ({"attention": {"backend": "xformers"}}, ["attention.backend='xformers'", "sdpa"]),
    ({"mlp": {"hidden": 1}}, ["layer='mlp'", "swiglu"]),
    ({"swiglu": {"hidden": -3}}, ["swiglu.hidden=-3", "positive"]),
    ({"d_model": 0}, ["d_model=0", "positive integer"]),
    ({"vocab_size": 2.5}, ["vocab_size=2.5", "positive integer"]),
    ({"mamba3": {"d_state": 2}}, ["mamba3.d_state=2", ">= 4 at rope_fraction=0.5"]),
    ({"attention": {"n_heads": True}}, ["attention.n_heads=True", "an integer"]),
    (
        {"attention": {"n_heads": 4, "rope_theta": float("inf")}},
        ["attention.rope_theta=inf", "a finite number"],
    ),
    ({"mamba3": {"dt_min": "1e-3"}}, ["mamba3.dt_min='1e-3'", "a finite number"]),
    ({"mamba3": {"pregate_norm": "no"}}, ["mamba3.pregate_norm='no'", "true or false"]),
    ({"swiglu": {"hidden": True}}, ["swiglu.hidden=True", "an integer or null"]),
]


def test_numpy_scalars_are_taken_as_python_numbers():
    import json

    import numpy as np

    config = ModelConfig.from_pattern("M-*-", d_model=64, attention={"n_heads": np.int64(4)},
                                      mamba3={"dt_min": np.float32(1e-3)})  # fmt: skip
    assert type(config.layers[2].config.n_heads) is int
    assert type(config.layers[0].config.dt_min) is float
    json.dumps(config.to_dict())


def test_options_of_a_kind_the_pattern_lacks_are_still_checked():
    """A typo or a wrong type under a kind the pattern does not use is refused, not ignored
    (its fit to d_model is not: a search passes every kind's section)."""
    with pytest.raises(ValueError, match=r"mamba3\.foo=1 is invalid"):
        ModelConfig.from_pattern("*-", d_model=64, attention={"n_heads": 4}, mamba3={"foo": 1})
    ModelConfig.from_pattern("*-", d_model=64, attention={"n_heads": 4}, mamba3={"headdim": 48})


@pytest.mark.parametrize(("kwargs", "fragments"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_names_field_value_and_allowed(kwargs, fragments):
    args = {"pattern": "M-*-", "d_model": 64, "attention": {"n_heads": 4}, **kwargs}
    with pytest.raises(ValueError) as error:
        ModelConfig.from_pattern(args.pop("pattern"), **args)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "allowed" in message


def test_unknown_layer_name():
    with pytest.raises(ValueError, match=r"layer='conv'.*allowed.*mamba3"):
        build(LayerSpec("conv", None), 64)


def test_build_validates_before_allocating(monkeypatch):
    constructed = []
    monkeypatch.setattr(Mamba3, "__init__", lambda *a, **k: constructed.append(a))
    with pytest.raises(ValueError, match=r"mamba3\.headdim=48"):
        build(LayerSpec("mamba3", Mamba3Config(headdim=48)), 64)
    assert constructed == []


def test_with_layer_options_changes_one_kind_and_validates():
    config = ModelConfig.from_pattern(
        "M-*-M-", d_model=64, mamba3={"d_state": 32, "headdim": 16}, attention={"n_heads": 4}
    )
    changed = config.with_layer_options(mamba3={"mimo_rank": 4})
    mamba = [spec.config for spec in changed.layers if spec.kind == "mamba3"]
    assert [(c.mimo_rank, c.d_state, c.headdim) for c in mamba] == [(4, 32, 16)] * 2
    assert [s for s in changed.layers if s.kind != "mamba3"] == [
        s for s in config.layers if s.kind != "mamba3"
    ]
    assert config.layers[0].config.mimo_rank == 1  # a copy
    with pytest.raises(ValueError, match=r"mamba3\.bogus=1 is invalid"):
        config.with_layer_options(mamba3={"bogus": 1})
    with pytest.raises(ValueError, match=r"mamba3\.headdim=48 is invalid"):
        config.with_layer_options(mamba3={"headdim": 48})
    with pytest.raises(ValueError, match="allowed: \\['attention', 'mamba3', 'swiglu'\\]"):
        config.with_layer_options(mamba9={"d_state": 8})
