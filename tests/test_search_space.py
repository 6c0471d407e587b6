"""Search-space files: every problem reported with its YAML path, all at once, before any
study exists; valid files round-trip; trials map to models deterministically."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from hybrid.cli import build_parser, main
from hybrid.model import HybridLM
from hybrid.search.export import train_command
from hybrid.search.space import DataSection, SpaceError, make_pattern, parse_space
from hybrid.train import TrainConfig

BASE = {
    "name": "t",
    "model": {
        "d_model": 64,
        "n_mixers": 4,
        "mamba3": {"d_state": 16, "headdim": 16, "mimo_rank": {"choices": [1, 2]}},
        "attention": {"n_heads": 4},
        "mlp": {"hidden": 128},
        "layout": {
            "attention_ratio": {"low": 0.0, "high": 0.5, "step": 0.25},
            "placement": {"choices": ["even", "front"]},
        },
    },
    "data": {"corpus": "shakespeare", "seq_len": 64},
    "train": {"steps": 10, "lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
    "objectives": [{"metric": "val_perplexity"}, {"metric": "params"}],
    "search": {"n_trials": 4, "seed_designs": ["mamba3", "M-M-*-M-"]},
}


def _text(mutate=None) -> str:
    spec = copy.deepcopy(BASE)
    if mutate:
        mutate(spec)
    return yaml.safe_dump(spec, sort_keys=False)


def _problems(mutate) -> list[str]:
    with pytest.raises(SpaceError) as error:
        parse_space(_text(mutate))
    return error.value.problems


def _set(path: str, value):
    def mutate(spec):
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value

    return mutate


BAD = [
    (
        _set("model.mamba3.d_stat", 8),
        "model.mamba3.d_stat: Extra inputs are not permitted (got 8); did you mean 'd_state'?; "
        "allowed keys: d_state, ",
    ),
    (_set("train.learning_rate", 1.0), "train.learning_rate: Extra inputs are not permitted"),
    (_set("model.attention.n_heads", "four"), "model.attention.n_heads: Input should be a valid"),
    (
        _set("model.mamba3.mimo_rank", {"choices": []}),
        "model.mamba3.mimo_rank.choices: List should have at least 1 item",
    ),
    (
        _set("model.layout.attention_ratio", {"low": 0.6, "high": 0.5}),
        "model.layout.attention_ratio: low=0.6 > high=0.5",
    ),
    (
        _set("model.layout.attention_ratio", {"choices": [0.0, 1.5]}),
        "model.layout.attention_ratio: [0.0, 1.5] must lie in [0, 1]",
    ),
    (
        _set("model.layout", {"patterns": ["M-*-", "--"]}),
        "model.layout.patterns[1]: '--' has no mixer",
    ),
    (_set("model.layout", {"patterns": ["M-X-"]}), "model.layout.patterns[0]: pattern='M-X-'"),
    (
        _set("objectives", [{"metric": "val_perplexity"}, {"metric": "speed"}]),
        "objectives[1].metric: Input should be 'val_perplexity'",
    ),
    (
        _set("objectives", [{"metric": "val_perplexity"}]),
        "objectives: List should have at least 2 items",
    ),
    (_set("constraints", {"max_params": 1000}), "constraints: no point of the space meets them"),
    (
        _set("model.mamba3.headdim", {"choices": [16, 48]}),
        "model.mamba3.headdim=48 is invalid; allowed: a divisor of d_inner",
    ),
    (
        _set("search.seed_designs", ["transformer"]),
        "search.seed_designs[0]: 'transformer': needs 4 attention mixer(s) of 4",
    ),
    (_set("model.n_mixers", 0), "model.n_mixers=0 is invalid; allowed: an integer >= 1"),
    (_set("search.sampler", "cmaes"), "search.sampler: Input should be 'tpe'"),
    (_set("train.steps", None), "train.tokens/steps/seconds=None is invalid"),
    (_set("model.mamba3.mimo_rank", {"lo": 1}), "model.mamba3.mimo_rank.low: Field required"),
    (_set("train.cuda_graph", "sometimes"), "train.cuda_graph: Input should be a valid boolean"),
    (_set("model.layout", {"patterns": []}), "model.layout.patterns: List should have at least 1"),
    (
        _set("model.layout", {"patterns": ["M-*-"], "placement": "front"}),
        "model.layout.placement: not used with model.layout.patterns",
    ),
    (_set("seed", -1), "seed: Input should be greater than or equal to 0"),
    (_set("search.hv_reference", [1.0]), "search.hv_reference: 1 value(s) for 2 objectives"),
    (
        _set("search.storage", "redis://x"),
        "search.storage: 'redis://x' is invalid; allowed: journal",
    ),
    (
        _set("tracking", {"uri": "foo://bar"}),
        "tracking.uri: 'foo://bar' is invalid; allowed: sqlite",
    ),
    (_set("search.study_name", ""), "search.study_name: String should have at least 1 character"),
    (_set("data.tokenizer", "bpe:0"), "data.tokenizer: tokenizer='bpe:0' is invalid"),
    (_set("data.hub_config", "en"), "data: hub_config='en' is invalid for corpus 'shakespeare'"),
    (_set("model.d_model", True), "model.d_model: a number is needed, not true"),
    (_set("data.max_documents", 1), "data.max_documents: Input should be greater than or equal"),
    (_set("train.grad_clip", -1.0), "train.grad_clip=-1.0 is invalid; allowed: a number >= 0"),
    (_set("train.beta1", 1.5), "train.beta1=1.5 is invalid; allowed: a number in [0, 1)"),
    (_set("train.weight_decay", -0.1), "train.weight_decay=-0.1 is invalid"),
    (_set("train.data_seed", -1), "train.data_seed=-1 is invalid"),
    (_set("model.mlp.hidden", 0), "model.mlp.hidden=0 is invalid; allowed: a positive integer"),
    (_set("model.mamba3.dt_max", -0.1), "model.mamba3.dt_max=-0.1 is invalid"),
    (
        _set("model.mamba3.pregate_norm", {"low": 0, "high": 1}),
        "model.mamba3.pregate_norm: a range is not allowed here",
    ),
    (
        _set("model.d_model", {"choice": [32, 64]}),
        "model.d_model.choice: Extra inputs are not "
        "permitted (got [32, 64]); did you mean 'choices'?",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), BAD, ids=[b[1][:40] for b in BAD])
def test_each_problem_names_its_yaml_path(mutate, expected):
    problems = _problems(mutate)
    assert any(p.startswith(expected) for p in problems), problems


def test_a_key_invalid_at_many_values_is_one_line():
    problems = _problems(_set("model.mamba3.rope_fraction", {"low": 0.5, "high": 1.0}))
    assert len(problems) == 1, problems
    assert problems[0].startswith("model.mamba3.rope_fraction=")
    assert "more of its values in the space" in problems[0]


def test_a_key_given_twice_is_refused():
    text = _text().replace("name: t\n", "name: t\nname: u\n", 1)
    with pytest.raises(SpaceError, match="key 'name' given twice"):
        parse_space(text)


def test_a_float_step_meant_to_divide_the_range_holds_its_last_value():
    """0.0833 for twelfths: the range keeps its 7 values (Optuna would cut high to 0.4998 with
    a warning mid-search; here high is 6 whole steps, which Optuna accepts silently)."""
    import warnings

    import optuna

    space = parse_space(_text(_set("model.layout.attention_ratio",
                                   {"low": 0.0, "high": 0.5, "step": 0.0833})))  # fmt: skip
    ratio = space.dimensions["model.layout.attention_ratio"]
    assert ratio.high == pytest.approx(6 * 0.0833) and len(ratio.grid(limit=100)) == 7
    study = optuna.create_study()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratio.suggest(study.ask())


def test_store_folders_are_checked_where_the_address_in_force_is_opened():
    """The file's scheme is checked when it is read; a missing folder only where that
    address is opened (a --storage or --tracking-uri may replace the file's)."""
    from hybrid.search.stores import check_tracking_uri
    from hybrid.search.study import open_storage

    missing = "journal:/no/such/folder/x.log"
    parse_space(_text(_set("search.storage", missing)))
    with pytest.raises(ValueError, match="folder '/no/such/folder' does not exist"):
        open_storage(missing)
    for uri in ("databricks://profile", "file:/tmp/runs", "runs", "sqlite:///mlflow.db"):
        check_tracking_uri(uri)


def test_a_step_that_leaves_high_out_is_said_once_at_load():
    """As Optuna would cut it, but said when the file is read, not mid-search; the range
    keeps the values that fit (an older study's file still loads, so it still resumes)."""
    with pytest.warns(
        UserWarning, match=r"model\.d_model: step=32 .* its last value is 64, not 72"
    ):
        space = parse_space(_text(_set("model.d_model", {"low": 32, "high": 72, "step": 32})))
    assert space.dimensions["model.d_model"].grid() == [32, 64]
    with pytest.warns(UserWarning, match="its last value is 0.8335, not 1"):  # a step written long
        space = parse_space(_text(_set("train.warmup", {"low": 0.0, "high": 1.0, "step": 0.1667})))
    assert space.dimensions["train.warmup"].high == pytest.approx(0.8335)


def test_cuda_graph_on_a_cpu_is_refused_before_the_study():
    import torch

    space = parse_space(_text(_set("train.cuda_graph", {"choices": [False, True]})))
    with pytest.raises(ValueError, match=r"train\.cuda_graph=True is invalid"):
        space.check_device(torch.device("cpu"))
    parse_space(_text(_set("train.cuda_graph", False))).check_device(torch.device("cpu"))


def test_all_problems_are_reported_together():
    def many(spec):
        spec["model"]["d_modle"] = 1
        spec["model"]["attention"]["n_heads"] = "x"
        spec["search"]["sampler"] = "nope"

    problems = _problems(many)
    assert len(problems) == 3
    assert {p.split(":")[0] for p in problems} == {
        "model.d_modle",
        "model.attention.n_heads",
        "search.sampler",
    }


def test_cli_exits_2_and_writes_no_study(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(_text(_set("model.mamba3.mimo_rank", {"choices": []})))
    assert main(["search", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.mamba3.mimo_rank.choices" in err
    assert list(tmp_path.iterdir()) == [bad]  # no journal, no MLflow store


def test_valid_file_round_trips():
    space = parse_space(_text())
    dumped = yaml.safe_dump(space.spec.model_dump(mode="json"), sort_keys=False)
    again = parse_space(dumped)
    assert again.spec == space.spec
    assert list(again.dimensions) == [
        "model.mamba3.mimo_rank",
        "model.layout.attention_ratio",
        "model.layout.placement",
        "train.lr",
    ]


def test_scientific_notation_is_a_number():
    space = parse_space(_text(_set("train.tokens", "PLACEHOLDER")).replace("PLACEHOLDER", "2e6"))
    assert space.fixed["train.tokens"] == 2_000_000


def test_trial_to_model_is_deterministic_and_shown():
    space = parse_space(_text())
    params = {
        "model.mamba3.mimo_rank": 2,
        "model.layout.attention_ratio": 0.25,
        "model.layout.placement": "front",
        "train.lr": 2e-3,
    }
    a, b = space.plan(params), space.plan(dict(params))
    assert a.pattern == b.pattern == "*-M-M-M-" and a.key == b.key
    assert a.model.layers[2].config.mimo_rank == 2 and a.train.lr == 2e-3
    assert space.plan({**params, "train.lr": 3e-3}).key != a.key
    graphless = parse_space(_text(_set("train.cuda_graph", False))).plan(params)
    assert graphless.train.cuda_graph is False and a.train.cuda_graph is None
    assert graphless.key == a.key  # how the step is issued is not part of the recipe
    exact = parse_space(_text(_set("train.deterministic", True))).plan(params)
    assert exact.train.deterministic is True and a.train.deterministic is False
    assert exact.key == a.key


@pytest.mark.parametrize(
    ("n", "ratio", "placement", "pattern"),
    [
        (8, 0.125, "even", "MMMM*MMM"),
        (8, 0.25, "even", "MM*MMM*M"),
        (6, 0.5, "front", "***MMM"),
        (6, 0.5, "back", "MMM***"),
        (6, 1 / 3, "middle", "MM**MM"),
        (4, 0.0, "even", "MMMM"),
        (4, 1.0, "middle", "****"),
    ],
)
def test_make_pattern(n, ratio, placement, pattern):
    assert make_pattern(n, ratio, placement, mlp=False) == pattern
    assert make_pattern(n, ratio, placement).replace("-", "") == pattern


def test_matched_mlp_keeps_parameters_of_the_siso_twin():
    space = parse_space(_text(_set("model.mlp", {"hidden": 128, "match_mimo_params": True})))
    siso = space.plan(
        {
            "model.mamba3.mimo_rank": 1,
            "model.layout.attention_ratio": 0.0,
            "model.layout.placement": "even",
            "train.lr": 1e-3,
        }
    )
    mimo = space.plan(
        {
            "model.mamba3.mimo_rank": 2,
            "model.layout.attention_ratio": 0.0,
            "model.layout.placement": "even",
            "train.lr": 1e-3,
        }
    )
    n_siso = HybridLM(siso.model, device="meta").num_params()
    n_mimo = HybridLM(mimo.model, device="meta").num_params()
    assert mimo.model.layers[1].config.hidden < 128
    assert n_mimo <= n_siso < n_mimo + 4 * 3 * 64 * 16  # within one 16-wide step per MLP


def test_seed_designs_map_to_points():
    space = parse_space(_text())
    assert space.plan(space.seed_params("mamba3")).pattern == "M-M-M-M-"
    assert space.plan(space.seed_params("M-M-*-M-")).pattern == "M-M-*-M-"
    with pytest.raises(ValueError, match="not a point of this space"):
        space.seed_params("M-*-M-M-")
    searched = parse_space(_text(_set("model.n_mixers", {"choices": [4, 6]})))
    assert searched.plan(searched.seed_params("mamba3")).pattern == "M-M-M-M-"


def test_the_exported_train_command_parses_back_to_the_same_settings():
    """Every data setting and every non-default training setting survives the round trip
    through `hybrid train`'s own parser (bools as words, the streaming switch, None left out)."""
    data = DataSection(
        corpus="hub:some/set", seq_len=256, tokenizer="bpe:512", hub_config="en",
        streaming=True, max_documents=1000, val_fraction=0.1, text_field="body",
    )  # fmt: skip
    train = TrainConfig(
        batch_size=8, seq_len=256, tokens=50_000, lr=1e-3, schedule="wsd", cuda_graph=False,
        deterministic=True, eval_every=20,
    )  # fmt: skip
    command = train_command(Path("out dir/model_config.json"), data, train)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.model_config == Path("out dir/model_config.json")
    for name in ("corpus", "tokenizer", "hub_config", "streaming", "max_documents",
                 "val_fraction", "text_field", "hub_split"):  # fmt: skip
        assert getattr(args, name) == getattr(data, name), name
    assert TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__}) == train
