"""`hybrid` command line. Subcommands so far: `layers` (the registry) and `describe`
(size, state and FLOPs of a pattern without allocating it)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from hybrid.config import ModelConfig
from hybrid.layers import available, entry
from hybrid.model import HybridLM


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`mamba3.d_state=64` -> {"mamba3": {"d_state": 64}} (values parsed as YAML scalars)."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        layer, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r} is invalid; allowed: LAYER.FIELD=VALUE")
        options.setdefault(layer, {})[field] = yaml.safe_load(value)
    return options


def _cmd_layers(_: argparse.Namespace) -> None:
    for name in available():
        e = entry(name)
        kind = "mixer" if e.is_mixer else "mlp"
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(e.config_cls))
        print(f"{e.symbol}  {name:<10} {kind:<5} {defaults}")


def _cmd_describe(args: argparse.Namespace) -> None:
    config = ModelConfig.from_pattern(
        args.pattern,
        d_model=args.d_model,
        vocab_size=args.vocab_size,
        **_parse_overrides(args.set),
    )
    model = HybridLM(config, device="meta")
    rows = [
        ("pattern", config.pattern),
        ("mixers", f"{config.n_mixers} (attention ratio over mixers {config.attention_ratio:.3f})"),
        ("params (non-embedding)", f"{model.num_params():,}"),
        ("params (total)", f"{model.num_params(non_embedding=False):,}"),
        (f"state bytes / sequence @ {args.context}", f"{model.state_bytes(args.context):,}"),
        (f"prefill FLOPs / token @ {args.context}", f"{model.flops_per_token(args.context):,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("layers", help="list registered layers, symbols and defaults").set_defaults(
        run=_cmd_layers
    )
    describe = sub.add_parser("describe", help="parameters, state bytes and FLOPs of a pattern")
    describe.add_argument("--pattern", required=True, help="e.g. 'M-M-M-*-'")
    describe.add_argument("--d-model", type=int, required=True)
    describe.add_argument("--vocab-size", type=int, default=256)
    describe.add_argument("--context", type=int, default=2048, help="tokens (default 2048)")
    describe.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LAYER.FIELD=VALUE",
        help="layer option, e.g. mamba3.mimo_rank=4 (repeatable)",
    )
    describe.set_defaults(run=_cmd_describe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            args.run(args)
    except ValueError as error:
        print(f"hybrid: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
