"""YAML search space -> validated `SearchSpace` -> Optuna distributions -> ModelConfig.

Any scalar under `model` (its layer sections and `layout` included) and `train` may be a
search dimension: `{choices: [...]}` or `{low, high[, step][, log]}`. Every problem in a file
is collected and reported together, each with its YAML path (`SpaceError`), before a study is
touched. A trial's parameters map to exactly one `TrialPlan` (ModelConfig, TrainConfig,
pattern), deterministically.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import hashlib
import itertools
import json
import math
import random
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_type_hints

import torch
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from hybrid.config import ModelConfig, parse_pattern
from hybrid.data import CorpusSpec
from hybrid.layers import entry
from hybrid.layers.attention import AttentionConfig
from hybrid.layers.mamba3 import Mamba3Config
from hybrid.layers.swiglu import SwiGLUConfig
from hybrid.model import HybridLM
from hybrid.search.stores import check_storage, check_tracking_uri
from hybrid.tokenizer import check_tokenizer_spec
from hybrid.train import TrainConfig
from hybrid.train_step import use_cuda_graph

PLACEMENTS = ("even", "front", "back", "middle")
METRICS = (
    "val_perplexity",
    "val_bpb",
    "val_loss",
    "prefill_latency_ms",
    "decode_latency_ms",
    "peak_memory_bytes",
    "state_bytes",
    "params",
    "flops_per_token",
)
SEED_DESIGNS = {  # name: attention ratio over mixers, evenly placed
    "transformer": 1.0,
    "mamba3": 0.0,
    "jamba_1_7": 1 / 8,
    "nemotron_h": 1 / 12,
}
MAX_CHECKED_POINTS = 512
# a model configuration's names (hybrid.config, the layers) -> the search file's keys
CONFIG_PATHS = (
    ("swiglu.", "model.mlp."),
    ("mamba3.", "model.mamba3."),
    ("attention.", "model.attention."),
    ("d_model=", "model.d_model="),
)
STEP_SLACK = 0.01  # a float step written short of dividing its range by this many steps
T = TypeVar("T")


class SpaceError(ValueError):
    """Every problem of a search-space file, one `path: message` per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid search space:\n" + "\n".join(f"  - {p}" for p in problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choices(_Model, Generic[T]):
    choices: list[T] = Field(min_length=1)


class Range(_Model, Generic[T]):
    low: T
    high: T
    step: T | None = None
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low={self.low} > high={self.high}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0 (got {self.low})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        return self


def stepped_high(path: str, r: Range) -> float:
    """The last value of a stepped range: low + n·step for the whole steps n that fit, in
    decimal arithmetic as Optuna checks it (given that high, Optuna does not cut it again
    with a warning in the middle of a search). A step written a little short of dividing the
    range (`0.0833` for twelfths of 0.5: within STEP_SLACK of a step) ends there silently;
    a step that leaves high out is said once, here."""
    span = _decimal(r.high) - _decimal(r.low)
    steps = span / _decimal(r.step)
    whole = int(steps)  # floor: the last value never passes high
    last = _decimal(r.low) + whole * _decimal(r.step)
    exact = all(isinstance(v, int) for v in (r.low, r.high, r.step))
    if steps != whole and (exact or steps - whole > decimal.Decimal(str(STEP_SLACK))):
        warnings.warn(
            f"{path}: step={r.step} does not divide high - low = {span} ({float(steps):.4g} "
            f"steps): its last value is {last}, not {r.high}",
            UserWarning,
            stacklevel=3,
        )
    return int(last) if exact else float(last)


def _decimal(value: float) -> decimal.Decimal:
    return decimal.Decimal(str(value))


def _kind_of(value: Any) -> str:
    """Which member of a dimension union a raw value (validation) or a model (serialisation)
    is."""
    if isinstance(value, Choices) or (isinstance(value, dict) and "choices" in value):
        return "choices"
    if isinstance(value, Range | dict):
        return "range"
    return "value"


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError(f"a number is needed, not {str(value).lower()}")
    return value


def _no_bools(annotation: Any) -> Any:
    """int / float (optional or not) refusing YAML's true and false."""
    for numeric in (int, float):
        number = Annotated[numeric, BeforeValidator(_refuse_bool)]
        if annotation is numeric:
            return number
        if annotation == numeric | None:
            return number | None
    return annotation


def dim(value_type: Any, range_type: Any = None) -> Any:
    """A field that is a value, `{choices: [...]}`, or (with a range_type)
    `{low, high[, step][, log]}`."""
    value_type = _no_bools(value_type)
    members = [Annotated[value_type, Tag("value")], Annotated[Choices[value_type], Tag("choices")]]
    if range_type is not None:
        members.append(Annotated[Range[_no_bools(range_type)], Tag("range")])
    return Annotated[Union[tuple(members)], Discriminator(_kind_of)]  # noqa: UP007


def _range_type(annotation: Any) -> Any:
    """int or float for (optional) numeric fields, None for the rest."""
    for numeric in (int, float):
        if annotation in (numeric, numeric | None):
            return numeric
    return None


def _section(name: str, cls: type, skip: tuple[str, ...] = (), **extra: Any) -> type[_Model]:
    """A pydantic model whose fields are `cls`'s dataclass fields, each a possible dimension."""
    hints = get_type_hints(cls)
    fields = {
        f.name: (dim(hints[f.name], _range_type(hints[f.name])), f.default)
        for f in dataclasses.fields(cls)
        if f.name not in skip
    }
    return create_model(name, __base__=_Model, **fields, **extra)


Mamba3Section = _section("Mamba3Section", Mamba3Config)
AttentionSection = _section("AttentionSection", AttentionConfig)
MLPSection = _section("MLPSection", SwiGLUConfig, match_mimo_params=(bool, False))
TrainSection = _section("TrainSection", TrainConfig, skip=("seq_len",))


class LayoutSection(_Model):
    """Either attention_ratio (+ placement) over model.n_mixers, or a list of patterns."""

    attention_ratio: dim(float, float) | None = None
    placement: dim(Literal[PLACEMENTS]) = "even"
    patterns: list[str] | None = Field(None, min_length=1)
    mlp: bool = True

    @model_validator(mode="after")
    def _one_layout(self) -> LayoutSection:
        if (self.attention_ratio is None) == (self.patterns is None):
            raise ValueError("give exactly one of attention_ratio or patterns")
        return self


class ModelSection(_Model):
    d_model: dim(int, int)
    n_mixers: dim(int, int) | None = None
    mamba3: Mamba3Section = Mamba3Section()
    attention: AttentionSection = AttentionSection()
    mlp: MLPSection = MLPSection()
    layout: LayoutSection


class DataSection(_Model):
    corpus: str
    seq_len: int = Field(512, ge=1)
    tokenizer: str = "bytes"
    text_field: str = "text"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    hub_config: str | None = None
    hub_split: str = "train"
    streaming: bool = False
    max_documents: int | None = Field(None, ge=2)  # a train and a validation document


class ObjectiveSection(_Model):
    metric: Literal[METRICS]
    direction: Literal["minimize", "maximize"] = "minimize"
    batch: int = Field(1, ge=1)
    context: int = Field(2048, ge=1)
    prompt_len: int = Field(512, ge=1)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_spread: float = Field(0.03, gt=0, le=1)


class ConstraintsSection(_Model):
    max_params: int | None = Field(None, ge=1)
    min_params: int | None = Field(None, ge=0)
    max_state_bytes: int | None = Field(None, ge=1)
    state_context: int = Field(2048, ge=1)


class SearchSection(_Model):
    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    n_trials: int | None = Field(32, ge=1)
    timeout: float | None = Field(None, gt=0)
    storage: str | None = None
    study_name: str | None = Field(None, min_length=1)
    seed_designs: list[str] = []
    hv_reference: list[float] | None = None
    heartbeat_interval: float = Field(30.0, gt=0)
    grace_period: float = Field(120.0, gt=0)
    # seconds of training between a trial's checkpoints (None: none); where they go
    checkpoint_interval: float | None = Field(600.0, gt=0)
    checkpoint_dir: str | None = None

    @model_validator(mode="after")
    def _grace_covers_beats(self) -> SearchSection:
        if self.grace_period < 2 * self.heartbeat_interval:
            raise ValueError(
                f"grace_period={self.grace_period} must be at least twice "
                f"heartbeat_interval={self.heartbeat_interval}"
            )
        return self


class TrackingSection(_Model):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = Field(None, min_length=1)


class SpaceFile(_Model):
    name: str = Field(min_length=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and Optuna's samplers' seed range
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    objectives: list[ObjectiveSection] = Field(min_length=2)
    constraints: ConstraintsSection = ConstraintsSection()
    search: SearchSection = SearchSection()
    tracking: TrackingSection = TrackingSection()


class _Loader(yaml.SafeLoader):
    """YAML with `2e6`-style floats (PyYAML reads them as strings), refusing a key given twice
    in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d[\d_]*)?\.?\d*[eE][-+]?\d+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: categorical `choices`, or an int/float range."""

    path: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def grid(self, limit: int = 9) -> list[Any]:
        """Representative values: every choice, or up to `limit` points of the range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            values = list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        elif self.step is not None:
            n = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            values = [self.low + i * self.step for i in range(n)]
        elif self.log:
            values = [self.low * (self.high / self.low) ** (i / (limit - 1)) for i in range(limit)]
        else:
            values = [self.low + (self.high - self.low) * i / (limit - 1) for i in range(limit)]
        if len(values) > limit:
            picks = {round(i * (len(values) - 1) / (limit - 1)) for i in range(limit)}
            values = [values[i] for i in sorted(picks)]
        return values

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if not self.low <= value <= self.high:
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-6
        return True


@dataclass(frozen=True)
class TrialPlan:
    """What one point of the space trains: the mapping is deterministic."""

    params: dict[str, Any]
    model: ModelConfig
    train: TrainConfig

    @property
    def pattern(self) -> str:
        return self.model.pattern

    @property
    def key(self) -> str:
        """Identifies the trained thing: equal keys are the same architecture and recipe."""
        blob = json.dumps(
            {"model": self.model.to_dict(), "train": self.train.recipe()}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_pattern(n_mixers: int, attention_ratio: float, placement: str, mlp: bool = True) -> str:
    """Place round(ratio · n_mixers) attention mixers among n_mixers; each mixer is followed
    by an MLP when `mlp`. even: centred in equal segments; front/back: first/last; middle:
    one centred block."""
    n_attn = round(attention_ratio * n_mixers)
    if placement == "even":
        slots = {int((k + 0.5) * n_mixers / n_attn) for k in range(n_attn)} if n_attn else set()
    elif placement == "front":
        slots = set(range(n_attn))
    elif placement == "back":
        slots = set(range(n_mixers - n_attn, n_mixers))
    else:
        start = (n_mixers - n_attn) // 2
        slots = set(range(start, start + n_attn))
    unit = "-" if mlp else ""
    return "".join(("*" if i in slots else "M") + unit for i in range(n_mixers))


def _leaves(section: BaseModel, prefix: str) -> Iterator[tuple[str, Any]]:
    for name in type(section).model_fields:
        value = getattr(section, name)
        path = f"{prefix}.{name}"
        if isinstance(value, BaseModel) and not isinstance(value, Choices | Range):
            yield from _leaves(value, path)
        else:
            yield path, value


def _dimension(path: str, value: Any, integer: bool) -> Dimension | None:
    if isinstance(value, Choices):
        return Dimension(path, "categorical", tuple(value.choices))
    if isinstance(value, Range):
        kind = "int" if integer else "float"
        high = value.high if value.step is None else stepped_high(path, value)
        return Dimension(path, kind, low=value.low, high=high, step=value.step, log=value.log)
    return None


def vocab_for(tokenizer: str) -> int:
    kind, _, size = tokenizer.partition(":")
    return int(size) if kind == "bpe" and size.isdigit() else 256


class SearchSpace:
    """A validated search-space file; `plan(params)` maps a point to what it trains."""

    def __init__(self, spec: SpaceFile, text: str = "") -> None:
        self.spec, self.text = spec, text
        self.fixed: dict[str, Any] = {}
        self.static_bounds: dict[str, int] = {}  # largest params/state/FLOPs seen by check()
        self.dimensions: dict[str, Dimension] = {}
        integer_paths = self._integer_paths()
        for path, value in itertools.chain(
            _leaves(spec.model, "model"), _leaves(spec.train, "train")
        ):
            if path == "model.layout.patterns" and value is not None:
                value = Choices(choices=value) if len(value) > 1 else value[0]
            d = _dimension(path, value, path in integer_paths)
            if d is None:
                self.fixed[path] = value
            else:
                self.dimensions[path] = d

    def _integer_paths(self) -> set[str]:
        paths = {"model.d_model", "model.n_mixers"}
        for prefix, cls in (
            ("model.mamba3", Mamba3Config),
            ("model.attention", AttentionConfig),
            ("model.mlp", SwiGLUConfig),
            ("train", TrainConfig),
        ):
            hints = get_type_hints(cls)
            paths |= {f"{prefix}.{n}" for n, t in hints.items() if t in (int, int | None)}
        return paths

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.spec.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.spec.objectives]

    def suggest(self, trial: Any) -> TrialPlan:
        return self.plan({p: d.suggest(trial) for p, d in self.dimensions.items()})

    def plan(self, params: Mapping[str, Any]) -> TrialPlan:
        v = {**self.fixed, **params}

        def section(prefix: str, cls: type) -> dict[str, Any]:
            return {f.name: v[f"{prefix}.{f.name}"] for f in dataclasses.fields(cls)}

        d_model = v["model.d_model"]
        if v.get("model.layout.patterns") is not None:
            pattern = v["model.layout.patterns"]
        else:
            n_mixers = v["model.n_mixers"]
            if n_mixers is None:
                raise ValueError("model.n_mixers is required with model.layout.attention_ratio")
            if n_mixers < 1:
                raise ValueError(f"model.n_mixers={n_mixers} is invalid; allowed: an integer >= 1")
            pattern = make_pattern(
                n_mixers,
                v["model.layout.attention_ratio"],
                v["model.layout.placement"],
                v["model.layout.mlp"],
            )
        mamba3 = section("model.mamba3", Mamba3Config)
        mlp = section("model.mlp", SwiGLUConfig)
        if v["model.mlp.match_mimo_params"] and mamba3["mimo_rank"] > 1 and "-" in pattern:
            mlp["hidden"] = _matched_mlp_hidden(pattern, d_model, mamba3, mlp["hidden"])
        model = ModelConfig.from_pattern(
            pattern,
            d_model=d_model,
            vocab_size=vocab_for(self.spec.data.tokenizer),
            mamba3=mamba3,
            attention=section("model.attention", AttentionConfig),
            swiglu=mlp,
        )
        train_values = {
            f.name: v[f"train.{f.name}"]
            for f in dataclasses.fields(TrainConfig)
            if f.name != "seq_len"
        }
        train = TrainConfig(seq_len=self.spec.data.seq_len, **train_values)
        return TrialPlan(dict(params), model, train)

    def _first(self) -> dict[str, Any]:
        """Every dimension at its first choice / low end."""
        return {p: d.grid()[0] for p, d in self.dimensions.items()}

    def seed_params(self, design: str) -> dict[str, Any]:
        """The parameters of a named design or an explicit pattern (the other dimensions at
        their first value), or ValueError if the space does not contain it."""
        base = self._first()
        if design in SEED_DESIGNS:
            ratio_dim = self.dimensions.get("model.layout.attention_ratio")
            if ratio_dim is None:
                raise ValueError("needs model.layout.attention_ratio to be a search dimension")
            target = SEED_DESIGNS[design]
            n_mixers = {**self.fixed, **base}["model.n_mixers"]
            n_attn = round(target * n_mixers)
            candidates = [target] if ratio_dim.contains(target) else ratio_dim.grid(limit=10**6)
            ratios = [r for r in candidates if round(r * n_mixers) == n_attn]
            if not ratios or (0 < target < 1 and n_attn == 0):
                raise ValueError(
                    f"needs {n_attn} attention mixer(s) of {n_mixers} (ratio {target:.3f}), "
                    "which model.layout.attention_ratio does not offer"
                )
            base["model.layout.attention_ratio"] = ratios[0]
            if "model.layout.placement" in self.dimensions:
                base["model.layout.placement"] = "even"
            return base
        patterns = self.dimensions.get("model.layout.patterns")
        if patterns is not None:
            if design in patterns.choices:
                return {**base, "model.layout.patterns": design}
        else:
            layout = {
                p: self.dimensions[p].grid(limit=10**6)
                for p in (
                    "model.n_mixers",
                    "model.layout.attention_ratio",
                    "model.layout.placement",
                )
                if p in self.dimensions
            }
            for combo in itertools.product(*layout.values()):
                point = {**base, **dict(zip(layout, combo, strict=True))}
                if self.plan(point).pattern == design:
                    return point
        raise ValueError(f"pattern {design!r} is not a point of this space")

    def points(self) -> Iterator[dict[str, Any]]:
        """Points varying the model dimensions (all of them when few, else a seeded sample),
        the training dimensions at their first value."""
        base = self._first()
        grids = {p: d.grid() for p, d in self.dimensions.items() if p.startswith("model.")}
        if math.prod(len(g) for g in grids.values()) <= MAX_CHECKED_POINTS:
            combos = itertools.product(*grids.values())
        else:
            rng = random.Random(self.spec.seed)
            combos = ([rng.choice(g) for g in grids.values()] for _ in range(MAX_CHECKED_POINTS))
        for combo in combos:
            yield {**base, **dict(zip(grids, combo, strict=True))}

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError if a setting of the file cannot run on `device` (train.cuda_graph:
        true off CUDA), before a study is opened rather than in every trial."""
        graph = self.dimensions.get("train.cuda_graph")
        for value in graph.choices if graph else [self.fixed["train.cuda_graph"]]:
            use_cuda_graph(value, device)

    def check(self) -> list[str]:
        """Problems that only show across the space: invalid training settings or model
        combinations, constraints no point meets, seed designs outside the space."""
        train_dims = {p: d for p, d in self.dimensions.items() if p.startswith("train.")}
        for values in itertools.product(*(d.grid(limit=2) for d in train_dims.values())):
            v = {**self.fixed, **dict(zip(train_dims, values, strict=True))}
            try:
                TrainConfig(
                    seq_len=self.spec.data.seq_len,
                    **{
                        f.name: v[f"train.{f.name}"]
                        for f in dataclasses.fields(TrainConfig)
                        if f.name != "seq_len"
                    },
                )
            except ValueError as error:  # it names its train.KEY
                return [str(error)]
        invalid: dict[str, tuple[int, str]] = {}  # message -> (count, first point)
        feasible, smallest, checked = 0, None, 0
        c = self.spec.constraints
        seen: dict[str, tuple[int, int]] = {}
        state_contexts = [o.context for o in self.spec.objectives if o.metric == "state_bytes"]
        for point in self.points():
            checked += 1
            try:
                plan = self.plan(point)
            except ValueError as error:
                where = (
                    ", ".join(
                        f"{k}={point[k]!r}" for k in self.dimensions if k.startswith("model.")
                    )
                    or "the fixed model"
                )
                count, first = invalid.get(str(error), (0, where))
                invalid[str(error)] = (count + 1, first)
                continue
            arch = json.dumps(plan.model.to_dict(), sort_keys=True)
            if arch not in seen:
                model = HybridLM(plan.model, device="meta")
                seen[arch] = (model.num_params(), model.state_bytes(c.state_context))
                for metric, value in (
                    ("params", seen[arch][0]),
                    ("flops_per_token", model.flops_per_token(self.spec.data.seq_len)),
                    *(("state_bytes", model.state_bytes(n)) for n in state_contexts),
                ):
                    self.static_bounds[metric] = max(self.static_bounds.get(metric, 0), value)
            params, state = seen[arch]
            smallest = params if smallest is None else min(smallest, params)
            feasible += (
                (c.max_params is None or params <= c.max_params)
                and (c.min_params is None or params >= c.min_params)
                and (c.max_state_bytes is None or state <= c.max_state_bytes)
            )
        problems = []
        for messages in _by_key(invalid).values():  # one line per key, not per bad value
            message, (count, first) = messages[0]
            line = _yaml_message(message)
            if len(messages) > 1:
                line += f" (and {len(messages) - 1} more of its values in the space)"
            elif count < checked:  # where adds nothing to a fixed value's error
                line += f" (at {count} of {checked} checked points, e.g. {first})"
            problems.append(line)
        if seen and not problems and feasible == 0:
            problems.append(
                f"constraints: no point of the space meets them (checked {len(seen)} "
                f"architectures; the smallest has {smallest:,} parameters)"
            )
        for i, design in enumerate(self.spec.search.seed_designs):
            try:
                self.seed_params(design)
            except ValueError as error:
                problems.append(f"search.seed_designs[{i}]: {design!r}: {error}")
        return problems


def _by_key(invalid: dict[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """Errors grouped by what they are about: `KEY=VALUE is invalid; ALLOWED` by KEY and
    ALLOWED (a range over an option of few allowed values fails once per value), any other
    message by itself."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for message, where in invalid.items():
        match = re.match(r"(\S+?)=.* is invalid;(.*)$", message)
        key = f"{match.group(1)};{match.group(2)}" if match else message
        groups.setdefault(key, []).append((message, where))
    return groups


def _yaml_message(message: str) -> str:
    """A model configuration's error as a line of the file: its layer-kind names (`swiglu.`,
    `mamba3.`, ...) become the YAML paths (`model.mlp.`, ...); other messages get `model: `."""
    for name, path in CONFIG_PATHS:
        if message.startswith(name):
            return path + message[len(name) :]
    return message if message.startswith("model.") else f"model: {message}"


def _matched_mlp_hidden(
    pattern: str, d_model: int, mamba3: dict[str, Any], hidden: int | None
) -> int:
    """Shrink the MLP so the model has the parameters of its SISO (rank 1) twin, as the
    paper does for MIMO: the extra Mamba-3 parameters come out of the MLPs, in steps of 16."""
    SwiGLUConfig(hidden=hidden).validate(d_model)  # its own error before a narrowing one
    siso = ModelConfig.from_pattern(pattern, d_model=d_model, mamba3={**mamba3, "mimo_rank": 1})
    mimo = ModelConfig.from_pattern(pattern, d_model=d_model, mamba3=mamba3)
    extra = HybridLM(mimo, device="meta").num_params() - HybridLM(siso, device="meta").num_params()
    width = SwiGLUConfig(hidden=hidden).hidden_size(d_model)
    n_mlp = pattern.count(entry("swiglu").symbol)
    shrink = math.ceil(extra / (n_mlp * 3 * d_model) / 16) * 16
    if shrink >= width:
        raise ValueError(
            f"model.mlp.match_mimo_params: the MLP ({width}) is too narrow to give "
            f"up {shrink} for mimo_rank={mamba3['mimo_rank']}"
        )
    return width - shrink


def _section_keys(loc: tuple[Any, ...]) -> list[str] | None:
    """The keys the section holding `loc`'s last item allows (None if not a section)."""
    model: Any = SpaceFile
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item) if isinstance(model, type) else None
        if field is None:
            return None
        inner = [field.annotation, *getattr(field.annotation, "__args__", ())]
        sections = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    return list(model.model_fields)


def _describe(error: Any) -> str:
    """One problem line from a pydantic error: a missing key without the whole section it is
    missing from, an unknown key with the keys its section allows."""
    where = _format_loc(error["loc"])
    if error["type"] == "missing":
        return f"{where}: {error['msg']}"
    if error["type"] == "union_tag_invalid":  # a range where only values can be
        return (
            f"{where}: a range is not allowed here (got {error.get('input')!r}); allowed: "
            "a value or {choices: [...]}"
        )
    message = error["msg"].removeprefix("Value error, ")  # a validator's own sentence
    line = f"{where}: {message} (got {error.get('input')!r})"
    if error["type"] == "extra_forbidden":
        section = _section_keys(error["loc"])  # None inside a dimension ({low, high, ...})
        keys = section or list(Range.model_fields)
        close = difflib.get_close_matches(str(error["loc"][-1]), [*keys, "choices"], n=1)
        line += f"; did you mean {close[0]!r}?" if close else ""
        line += f"; allowed keys: {', '.join(keys)}" if section else ""
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a YAML path, without the union tags it inserts after
    every dimension field (`mimo_rank.choices.choices` -> `mimo_rank.choices`)."""
    parts: list[str] = []
    tag_dropped = False
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif item in ("value", "choices", "range") and not tag_dropped:
            tag_dropped = True
        else:
            parts.append(str(item))
            tag_dropped = False
    return ".".join(parts)


def _file_problems(spec: SpaceFile) -> list[str]:
    """Problems between keys, or in values only a parser can check, each with its YAML path."""
    problems = []
    for i, pattern in enumerate(spec.model.layout.patterns or []):
        try:
            kinds = parse_pattern(pattern)
        except ValueError as error:
            problems.append(f"model.layout.patterns[{i}]: {error}")
            continue
        if not any(entry(k).is_mixer for k in kinds):
            problems.append(f"model.layout.patterns[{i}]: {pattern!r} has no mixer (M or *)")
    ratio = spec.model.layout.attention_ratio
    values = (
        ratio.choices
        if isinstance(ratio, Choices)
        else ([ratio.low, ratio.high] if isinstance(ratio, Range) else [ratio])
    )
    if ratio is not None and any(not 0 <= r <= 1 for r in values):
        problems.append(
            f"model.layout.attention_ratio: {values} must lie in [0, 1] "
            "(attention mixers / all mixers)"
        )
    layout = spec.model.layout
    if layout.attention_ratio is not None and spec.model.n_mixers is None:
        problems.append("model.n_mixers: required with model.layout.attention_ratio")
    if layout.patterns is not None:  # each pattern sets its own mixers and their places
        if spec.model.n_mixers is not None:
            problems.append("model.n_mixers: not used with model.layout.patterns: drop it")
        if "placement" in layout.model_fields_set:
            problems.append("model.layout.placement: not used with model.layout.patterns: drop it")
    metrics = [o.metric for o in spec.objectives]
    if len(set(metrics)) != len(metrics):
        problems.append(f"objectives: each metric at most once (got {metrics})")
    reference = spec.search.hv_reference
    if reference is not None and len(reference) != len(metrics):
        problems.append(
            f"search.hv_reference: {len(reference)} value(s) for {len(metrics)} objectives; "
            "allowed: one per objective, in their order"
        )
    for path, value, check in (
        ("data", spec.data, CorpusSpec.from_settings),  # options of another kind of corpus
        ("data.tokenizer", spec.data.tokenizer, check_tokenizer_spec),
        # schemes only: the folders are those of the addresses in force (a --storage or
        # --tracking-uri may replace these), checked where they are opened
        ("search.storage", spec.search.storage, partial(check_storage, folders=False)),
        ("tracking.uri", spec.tracking.uri, partial(check_tracking_uri, folders=False)),
    ):
        try:
            if value is not None:
                check(value)
        except ValueError as error:
            problems.append(f"{path}: {error}")
    return problems


def load_space(source: str | Path) -> SearchSpace:
    """Read and validate a search-space file; raise SpaceError listing every problem."""
    path = Path(source)
    if not path.is_file():
        raise SpaceError([f"{source}: no such file"])
    text = path.read_text()
    return parse_space(text, str(path))


def parse_space(text: str, origin: str = "<string>") -> SearchSpace:
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise SpaceError([f"{origin}: not valid YAML: {error}"]) from error
    if not isinstance(raw, dict):
        raise SpaceError([f"{origin}: the top level must be a mapping"])
    try:
        spec = SpaceFile.model_validate(raw)
    except ValidationError as error:
        raise SpaceError([_describe(e) for e in error.errors()]) from None
    problems = _file_problems(spec)
    if problems:
        raise SpaceError(problems)
    space = SearchSpace(spec, text)
    problems = space.check()
    if problems:
        raise SpaceError(problems)
    return space
