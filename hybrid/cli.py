"""`hybrid` command line: `search` (run or resume a search space), `worker` (join one),
`export` (its Pareto set as model configs), `ui` (the MLflow UI on its store), `bench`
(latency and memory, no training), `train` (one model on a corpus), `data` (prepare a corpus
and its token cache), `describe` (size, state and FLOPs of a pattern, nothing allocated),
`layers` (the registry)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm.auto import tqdm

from hybrid.config import ModelConfig
from hybrid.data import CorpusSpec
from hybrid.devices import resolve_device, visible_devices_for
from hybrid.layers import available, entry
from hybrid.model import HybridLM
from hybrid.search.latency import DTYPES
from hybrid.token_cache import TokenData, prepare_data
from hybrid.train import TrainConfig, TrainingDiverged, train

if TYPE_CHECKING:
    from hybrid.search.study import SearchOutcome


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`mamba3.d_state=64` -> {"mamba3": {"d_state": 64}} (values parsed as YAML scalars,
    `1e-3` as a number)."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        layer, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r} is invalid; allowed: LAYER.FIELD=VALUE")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        options.setdefault(layer, {})[field] = parsed
    return options


def _cmd_layers(_: argparse.Namespace) -> None:
    for name in available():
        e = entry(name)
        kind = "mixer" if e.is_mixer else "mlp"
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(e.config_cls))
        print(f"{e.symbol}  {name:<10} {kind:<5} {defaults}")


def _model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """From --pattern and --d-model, or from --model-config (whose vocab_size then stands);
    --set overrides the options of every layer of a kind either way."""
    overrides = _parse_overrides(args.set)
    if args.model_config is None:
        if args.pattern is None or args.d_model is None:
            raise ValueError("--pattern and --d-model are required (or --model-config FILE)")
        return ModelConfig.from_pattern(
            args.pattern, d_model=args.d_model, vocab_size=vocab_size, **overrides
        )
    if args.pattern is not None or args.d_model is not None:
        raise ValueError("--model-config gives the pattern and d_model: drop --pattern/--d-model")
    return read_model_config(args.model_config).with_layer_options(**overrides)


def read_model_config(path: Path) -> ModelConfig:
    """A `ModelConfig.to_dict()` in JSON or YAML: a trial's `model_config.json` (MLflow, or
    `hybrid export`)."""
    try:
        text = path.read_text()
        # by suffix: YAML 1.1 would read JSON's 1e-05 as a string
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"--model-config {path}: {error}") from None
    if not isinstance(data, dict) or "d_model" not in data or "layers" not in data:
        raise ValueError(
            f"--model-config {path}: not a model config (a mapping with d_model and layers, "
            "as `model_config.json` of a trial)"
        )
    try:
        return ModelConfig.from_dict(data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"--model-config {path}: {error!r}") from None


def _cmd_describe(args: argparse.Namespace) -> None:
    config = _model_config(args, args.vocab_size)
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


def _count(text: str) -> int:
    """Integers that may be written as 2e6 or 2_000_000."""
    value = float(text.replace("_", ""))
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def _trial_numbers(text: str) -> list[int]:
    """`3,9` -> [3, 9]."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of trial numbers"
        ) from None


def _word_parser(choices: dict[str, bool | None]) -> Callable[[str], bool | None]:
    """An argparse type taking one of `choices`' words (any case)."""

    def parse(text: str) -> bool | None:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return choices[text.lower()]

    return parse


_switch = _word_parser({"true": True, "false": False, "auto": None})  # None: the default decides
_boolean = _word_parser({"true": True, "false": False})


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", help="e.g. 'M-M-M-*-' (with --d-model)")
    parser.add_argument("--d-model", type=int)
    parser.add_argument(
        "--model-config",
        type=Path,
        help="instead of --pattern/--d-model: a model_config.json (a trial's, hybrid export)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LAYER.FIELD=VALUE",
        help="layer option, e.g. mamba3.mimo_rank=4 (repeatable)",
    )


def _add_corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus", required=True, help="shakespeare, austen, a local file/folder, or hub:NAME"
    )
    parser.add_argument("--text-field", default="text", help="json/parquet/hub text column")
    parser.add_argument("--hub-config", default=None, help="hub data set configuration")
    parser.add_argument("--hub-split", default="train", help="hub data set split")
    parser.add_argument("--streaming", action="store_true", help="stream a hub data set")
    parser.add_argument("--max-documents", type=_count, default=None)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--tokenizer", default="bytes", help="bytes (default) or bpe:VOCAB")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field, with its default and type."""
    for f in dataclasses.fields(TrainConfig):
        kind = {
            "int": _count,
            "int | None": _count,
            "float": float,
            "float | None": float,
            "str": str,
            "bool | None": _switch,
            "bool": _boolean,
        }[f.type]
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=f.default,
            help=f"train.{f.name} (default {'auto' if kind is _switch else f.default})",
        )


def _print_data(data: TokenData) -> None:
    corpus = data.corpus
    asked = data.tokenizer.name.removeprefix("bpe")
    if asked.isdigit() and int(asked) > data.tokenizer.vocab_size:  # a corpus too small for it
        tqdm.write(
            f"note: {data.tokenizer.name} learned {data.tokenizer.vocab_size} tokens: the corpus "
            "holds no more merges than that (the model's vocabulary is that size)"
        )
    print(
        f"corpus {corpus.name}: {len(corpus.train)} train / {len(corpus.val)} val documents, "
        f"{corpus.train_chars:,} / {corpus.val_chars:,} characters, "
        f"{len(data.train):,} / {len(data.val):,} {data.tokenizer.name} tokens "
        f"(vocab {data.tokenizer.vocab_size}); content hash {corpus.content_hash[:16]}; "
        f"token cache {data.directory}"
    )


def _cmd_data(args: argparse.Namespace) -> None:
    _print_data(prepare_data(CorpusSpec.from_settings(args), args.tokenizer))


def _output_file(path: Path | None, flag: str) -> None:
    """Refuse a folder and make the folders of an output file before the work that writes it
    (a run whose result then failed to save was lost)."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; allowed: a file path")
    path.parent.mkdir(parents=True, exist_ok=True)


def _cmd_train(args: argparse.Namespace) -> None:
    _output_file(args.metrics_json, "--metrics-json")  # train() checks --checkpoint's path
    corpus = CorpusSpec.from_settings(args)
    train_config = TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    )
    model_config = _model_config(args, vocab_size=256)  # validate before touching the data
    data = prepare_data(corpus, args.tokenizer)
    model_config = dataclasses.replace(model_config, vocab_size=data.tokenizer.vocab_size)
    _print_data(data)
    print(
        f"model {model_config.pattern}: d_model {model_config.d_model}, "
        f"{HybridLM(model_config, device='meta').num_params():,} non-embedding parameters"
    )

    evals: list[dict[str, float]] = []  # the periodic (--eval-every) and final evaluations

    def show(event: str, values: dict[str, float]) -> None:
        if event == "eval":
            evals.append(values)
        if event == "train":
            tqdm.write(
                f"step {values['step']:>6.0f}  tokens {values['tokens']:>12,.0f}  "
                f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  "
                f"{values['tokens_per_s']:>9,.0f} tok/s"
            )
        else:
            tqdm.write(
                f"step {values['step']:>6.0f}  val_loss {values['val_loss']:.4f}  "
                f"val_perplexity {values['val_perplexity']:.3f}  "
                f"val_bpb {values['val_bpb']:.4f}"
            )

    result = train(
        model_config,
        data,
        train_config,
        device=_device(args.device),
        callbacks=[show],
        checkpoint=args.checkpoint,
    )
    print("final: " + "  ".join(f"{k} {v:.6g}" for k, v in result.metrics.items()))
    if args.metrics_json:
        args.metrics_json.write_text(
            json.dumps(
                {
                    "metrics": result.metrics,
                    "curve": result.curve,
                    "evals": evals,
                    "model": model_config.to_dict(),
                    "train": dataclasses.asdict(train_config),
                    "data": data.key,
                },
                indent=1,
            )
        )


def _print_front(outcome: SearchOutcome, metrics: list[str]) -> None:
    pareto = outcome.front.pareto
    print(
        f"\nPareto set: {len(pareto)} of {len(outcome.front.rows)} feasible trials "
        f"(hypervolume {outcome.front.hypervolume:.6g})"
    )
    _print_trials(pareto, metrics)


def _print_trials(rows: list[dict[str, Any]], metrics: list[str]) -> None:
    """Front rows (`compute_front`) as a table: objectives, parameters, sampled values."""
    extra = [] if "params" in metrics else ["params"]
    header = ["trial", "pattern", *metrics, *extra, "sampled"]
    table = [
        [
            str(r["trial"]),
            r["pattern"],
            *(f"{r[m]:.5g}" for m in metrics),
            *(f"{r[m]:,}" for m in extra),
            r["point"],
        ]
        for r in rows
    ]
    widths = [max([len(h), *(len(row[i]) for row in table)]) for i, h in enumerate(header)]
    for row in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _gpu_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if text == "all":
        return list(range(torch.cuda.device_count()))
    try:
        ids = [int(g) for g in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus {text!r} is invalid; allowed: 'all' or ids like 0,1") from None
    visible = torch.cuda.device_count()
    if any(not 0 <= g < visible for g in ids):
        raise ValueError(
            f"--gpus {text}: {visible} CUDA device(s) visible; allowed: ids below {visible}"
        )
    return ids


def _cmd_search(args: argparse.Namespace) -> None:
    from hybrid.search.space import load_space
    from hybrid.search.study import (
        SearchOutcome,
        check_shared_storage,
        compute_front,
        default_storage,
        initialise_study,
        run_search,
    )
    from hybrid.search.worker import launch_workers

    space = load_space(args.space)
    storage = args.storage or default_storage(space)
    uri = args.tracking_uri or space.spec.tracking.uri
    gpus = _gpu_ids(args.gpus)
    workers = len(gpus) if gpus is not None else args.workers
    if gpus is not None and not gpus:
        raise ValueError("--gpus all: no CUDA device is visible")
    if args.gpus not in (None, "all") and workers == 1:
        # one GPU named: the search runs in this process, pinned to it as a worker would be
        # (nothing has touched CUDA yet; "all" counted the devices, and with one there is
        # nothing to pin)
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices_for(gpus[0])
    tracking = f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""
    if args.init:
        check_shared_storage(storage, "its workers")
        study, tracker = initialise_study(space, storage, args.tracking_uri)
        print(
            f"study {study.study_name!r} ready in {storage}; MLflow parent run "
            f"{tracker.parent_id} in {uri}. Start workers with: "
            f"hybrid worker {args.space} --storage {storage}{tracking}"
        )
        return
    if workers > 1:
        study = launch_workers(
            args.space,
            space,
            workers=workers,
            gpus=gpus,
            storage=storage,
            tracking_uri=args.tracking_uri,
            target=args.trials or space.spec.search.n_trials,
            device=args.device,
        )
        outcome = SearchOutcome(
            study, compute_front(study, space), study.user_attrs["mlflow_parent_run_id"], "", 0
        )
    else:
        outcome = run_search(
            space,
            n_trials=args.trials,
            storage=storage,
            tracking_uri=args.tracking_uri,
            device=_device(args.device),
        )
    _print_front(outcome, space.metric_names)
    browse = f"open {uri}" if _served(uri) else f"hybrid ui {args.space}{tracking}"
    print(f"\nMLflow: parent run {outcome.parent_run_id} in {uri}; browse with: {browse}")


def _served(uri: str) -> bool:
    """A tracking server (it serves its own UI), not a store `hybrid ui` can serve."""
    return uri.startswith(("http://", "https://"))


def _cmd_worker(args: argparse.Namespace) -> None:
    from hybrid.search.space import load_space
    from hybrid.search.study import check_shared_storage, join_study, load_data
    from hybrid.search.worker import trial_counts, work

    check_shared_storage(args.storage, "workers")
    if args.gpu is not None:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices_for(args.gpu)
    space = load_space(args.space)
    device = _device(args.device)
    space.check_device(device)
    data = load_data(space)
    study, tracker = join_study(space, args.storage, args.tracking_uri)
    target = args.trials or space.spec.search.n_trials
    ran = work(
        space,
        study,
        tracker,
        data,
        device,
        storage=args.storage,
        target=target,
        progress=not args.quiet,
    )
    complete, running = trial_counts(study)
    if target and complete >= target and not running:
        tracker.finish_study("FINISHED")  # the last worker out closes the parent run
    print(
        f"worker done: {ran} trials run here; study {study.study_name!r} holds "
        f"{complete} completed trials"
    )


def _cmd_export(args: argparse.Namespace) -> None:
    from hybrid.search.export import export_trials
    from hybrid.search.space import load_space
    from hybrid.search.study import default_storage, study_name_of

    space = load_space(args.space)
    out = args.out or Path(f"export-{study_name_of(space)}")
    exported = export_trials(space, args.storage or default_storage(space), out, args.trials)
    print(f"exported {len(exported)} trial(s) of study {study_name_of(space)!r} to {out}/")
    _print_trials([e.row for e in exported], space.metric_names)
    stale = sorted({p.name for p in out.glob("trial-*")} - {e.directory.name for e in exported})
    if stale:
        print(f"(also in {out}/ from an earlier export, not in this one: {', '.join(stale)})")
    print(f"\n{out}/front.csv; per trial model_config.json and trial.json. To train one again:")
    print(exported[0].train_command)


def _cmd_ui(args: argparse.Namespace) -> None:
    from hybrid.search.space import load_space
    from hybrid.search.study import study_name_of
    from hybrid.search.tracking import find_parent_run

    uri = args.tracking_uri or "sqlite:///mlflow.db"
    space = load_space(args.space) if args.space else None
    if space is not None:
        uri = args.tracking_uri or space.spec.tracking.uri
    if _served(uri):
        raise ValueError(
            f"tracking URI {uri} is a tracking server, which serves its own UI: open it in a "
            "browser; `hybrid ui` serves a store (sqlite:///PATH, postgresql://..., a folder)"
        )
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            raise ValueError(f"--port {args.port} is in use; allowed: a free port")
    parent = find_parent_run(uri, study_name_of(space)) if space is not None else None
    base = f"http://127.0.0.1:{args.port}"
    if parent is not None:
        experiment_id, run_id = parent
        print(f"study parent run: {base}/#/experiments/{experiment_id}/runs/{run_id}")
    elif space is not None:
        print(
            f"no run of study {study_name_of(space)!r} in {uri} yet: run `hybrid search "
            f"{args.space}` first, or name the store with --tracking-uri",
            file=sys.stderr,
        )
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    with contextlib.suppress(KeyboardInterrupt):
        code = subprocess.run(command, check=False).returncode
        if code not in (0, -signal.SIGINT, 130):  # 130 / -SIGINT: Ctrl-C reached it first
            raise CommandFailed(f"the MLflow server exited with {code} (its messages are above)")


def _device(name: str | None) -> torch.device:
    """The --device; `cuda:N` also becomes the current device, so that what a command does
    without naming a device (synchronisations, memory statistics, CUDA-graph streams) is
    done there too."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _bench(
    args: argparse.Namespace,
    configs: list[tuple[str, ModelConfig]],
    batches: list[int],
    contexts: list[int],
) -> None:
    from hybrid.search.bench import bench_rows, print_rows, write_json

    _output_file(args.json, "--json")
    device = _device(args.device)
    rows = bench_rows(
        configs, batches, contexts, args.prompt_len, args.dtype, device, use_cache=not args.no_cache
    )
    print_rows(rows, device)
    write_json(rows, args.json)


def _cmd_bench_model(args: argparse.Namespace) -> None:
    config = _model_config(args, args.vocab_size)
    _bench(args, [(config.pattern, config)], args.batch or [1], args.context or [2048])


def _cmd_bench_sweep(args: argparse.Namespace) -> None:
    from hybrid.search.bench import space_architectures
    from hybrid.search.space import load_space

    space = load_space(args.space)
    decode = [o for o in space.spec.objectives if o.metric == "decode_latency_ms"]
    batches = args.batch or ([decode[0].batch] if decode else [1])
    contexts = args.context or ([decode[0].context] if decode else [2048])
    _bench(args, space_architectures(space), batches, contexts)


def _positive(text: str) -> int:
    """An argparse type: a positive integer (a batch, a context, a length)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a positive integer")
    return value


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=_positive, action="append", help="repeatable (default 1)")
    parser.add_argument(
        "--context",
        type=_positive,
        action="append",
        help="decode context, repeatable (default 2048)",
    )
    parser.add_argument("--prompt-len", type=_positive, default=512, help="prefill length (512)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="on CUDA; the CPU always measures float32",
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if any)")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="measure again instead of using $HYBRID_CACHE/latency.json",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every record here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("layers", help="list registered layers, symbols and defaults").set_defaults(
        run=_cmd_layers
    )
    search = sub.add_parser("search", help="run or resume the search a YAML file describes")
    search.add_argument("space", help="search-space YAML, e.g. experiments/quickstart.yaml")
    search.add_argument(
        "--trials",
        type=int,
        default=None,
        help="completed trials wanted (default: search.n_trials)",
    )
    search.add_argument(
        "--storage",
        default=None,
        help="journal:PATH, sqlite:///PATH or postgresql://... "
        "(default: search.storage, else journal:./NAME.optuna.log)",
    )
    search.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: tracking.uri, sqlite:///mlflow.db)",
    )
    search.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if any)")
    search.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this host (journal or postgresql storage)",
    )
    search.add_argument(
        "--gpus", default=None, help="'all' or '0,1,...': one worker per GPU, pinned"
    )
    search.add_argument(
        "--init",
        action="store_true",
        help="only create the study and its MLflow parent run (before "
        "starting `hybrid worker`s on other hosts)",
    )
    search.set_defaults(run=_cmd_search)

    worker = sub.add_parser("worker", help="pull trials of an existing study until it is done")
    worker.add_argument("space", help="search-space YAML")
    worker.add_argument("--storage", required=True, help="journal:PATH or postgresql://...")
    worker.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri)"
    )
    worker.add_argument(
        "--trials",
        type=int,
        default=None,
        help="completed trials the study should reach (default: n_trials)",
    )
    worker.add_argument("--gpu", type=int, default=None, help="pin to this GPU")
    worker.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if any)")
    worker.add_argument("--quiet", action="store_true", help="no progress bar")
    worker.set_defaults(run=_cmd_worker)

    export = sub.add_parser(
        "export", help="write a study's Pareto set (or chosen trials) as model configs"
    )
    export.add_argument("space", help="the search-space YAML the study ran")
    export.add_argument("--storage", default=None, help="the study's storage (default: the file's)")
    export.add_argument(
        "--trials",
        type=_trial_numbers,
        default=None,
        help="comma-separated trial numbers (default: the Pareto set)",
    )
    export.add_argument(
        "--out", type=Path, default=None, help="directory (default: export-STUDY_NAME)"
    )
    export.set_defaults(run=_cmd_export)

    ui = sub.add_parser("ui", help="the MLflow UI on a study's store, on 127.0.0.1")
    ui.add_argument("space", nargs="?", help="search-space YAML (finds its store and study)")
    ui.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri)"
    )
    ui.add_argument("--port", type=int, default=5000, help="port to serve on (default 5000)")
    ui.set_defaults(run=_cmd_ui)

    bench = sub.add_parser("bench", help="latency and memory without training")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_model = bench_sub.add_parser("model", help="one architecture")
    _add_model_options(bench_model)
    bench_model.add_argument("--vocab-size", type=int, default=256)
    _add_bench_options(bench_model)
    bench_model.set_defaults(run=_cmd_bench_model)
    bench_sweep = bench_sub.add_parser("sweep", help="every architecture of a search space")
    bench_sweep.add_argument("space", help="search-space YAML")
    _add_bench_options(bench_sweep)
    bench_sweep.set_defaults(run=_cmd_bench_sweep)

    describe = sub.add_parser("describe", help="parameters, state bytes and FLOPs of a pattern")
    _add_model_options(describe)
    describe.add_argument("--vocab-size", type=int, default=256)
    describe.add_argument("--context", type=_positive, default=2048, help="tokens (default 2048)")
    describe.set_defaults(run=_cmd_describe)

    data = sub.add_parser("data", help="prepare a corpus, its split and its token cache")
    _add_corpus_options(data)
    data.set_defaults(run=_cmd_data)

    train_cmd = sub.add_parser("train", help="train one model on a corpus, report perplexity")
    _add_model_options(train_cmd)
    _add_corpus_options(train_cmd)
    _add_train_options(train_cmd)
    train_cmd.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if any)")
    train_cmd.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="save here every --checkpoint-every steps; resume from it",
    )
    train_cmd.add_argument(
        "--metrics-json",
        type=Path,
        default=None,
        help="write the final metrics and the loss curve here",
    )
    train_cmd.set_defaults(run=_cmd_train)
    return parser


class CommandFailed(RuntimeError):
    """A command whose own work failed (not bad input): one line, exit 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's scancel or time limit, `kill`): handled as Ctrl-C is, the trial in
    hand failed and queued again, then exit 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _after_interrupt(args: argparse.Namespace) -> str:
    """What a stopped command left to resume from, for its one-line farewell."""
    if args.run in (_cmd_search, _cmd_worker):
        return " (a search resumes where it stopped when run again)"
    if args.run is _cmd_train:
        if args.checkpoint is None:
            return " (nothing was saved: --checkpoint PATH makes a run resumable)"
        return f" (the same command resumes from {str(args.checkpoint)!r}, saved every " \
            f"{args.checkpoint_every} steps)"  # fmt: skip
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow prints a "View run" link per run it ends against a tracking server
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        args.run(args)
    except ValueError as error:  # bad input: one line, exit 2
        print(f"hybrid: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"hybrid: error: {error}", file=sys.stderr)
        return 3
    except RuntimeError as error:
        from hybrid.search.worker import TooManyFailures  # the search modules load lazily

        if isinstance(error, CommandFailed):
            print(f"hybrid: error: {error}", file=sys.stderr)
            return 1
        if not isinstance(error, TooManyFailures):
            raise
        print(f"hybrid: error: {error}", file=sys.stderr)
        return 4
    except BrokenPipeError:  # `hybrid describe ... | head`: the reader left, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as stop:
        how = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"hybrid: {how}{_after_interrupt(args)}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
