"""``susc influence``: the influence matrix of every checkpoint of a run, and its report.

    susc influence RUN_DIR --train train.jsonl --queries queries.jsonl [options]

Writes ``RUN_DIR/influence/step-{N}`` (skipping finished checkpoints unless ``--force``,
so an interrupted run continues where it stopped) and ``RUN_DIR/influence/report.html``:
each query's most influential training sequences at the last checkpoint and how they
changed over the series.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from transformers.utils import logging as hf_logging

from susc_callback.cli.common import (
    CommandError,
    announce_saved,
    announce_start,
    config_flags,
    load_model,
    load_tokenizer,
    sgld_config,
)
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.influence import InfluenceResult, estimate_influence
from susc_callback.influence.result import LEVELS
from susc_callback.logging.influence_report import sequence_texts, write_influence_report
from susc_callback.store.run import (
    INFLUENCE_FOLDER,
    RunStore,
    find_checkpoints,
    settings_differences,
)

REMEDY = "use the same flags, --force to recompute every checkpoint, or --out DIR"


def influence(args: argparse.Namespace) -> int:
    checkpoints = find_checkpoints(args.run_dir, args.checkpoints)
    out = Path(args.out) if args.out else Path(args.run_dir)
    store = RunStore.of_run(out, INFLUENCE_FOLDER, InfluenceResult)
    if args.no_progress or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.tokenizer, Path(args.run_dir), checkpoints)
    read = lambda path, what: ProbeSet.from_jsonl(  # noqa: E731
        path, tokenizer, max_length=args.max_length, what=what)
    train, queries = read(args.train, "training data"), read(args.queries, "queries")
    sampling = read(args.sampling_data, "sampling data") if args.sampling_data else train
    config = sgld_config(args)
    with store.writing():
        for index, (step, path) in enumerate(checkpoints.items(), 1):
            if store.has(step) and not args.force:
                _check_saved(store.load(step), store.step_dir(step), train, queries, config,
                             args)
                print(f"step {step}: done already ({store.step_dir(step)})")
                continue
            start = announce_start(step, index, len(checkpoints))
            try:
                result = estimate_influence(
                    load_model(path, tokenizer), train, queries, config,
                    components=args.components, train_level=args.train_level,
                    query_level=args.query_level, sampling_data=sampling.tensors, step=step)
            except ValueError as error:
                raise CommandError(f"{path}: {error}") from error
            result.extra.update(
                checkpoint=str(path), components=args.components,
                train_texts=_texts(train, tokenizer), query_texts=_texts(queries, tokenizer))
            announce_saved(step, store.save(result), start)
        report = write_influence_report(
            store.load_all(), store.root, tokenizer=tokenizer, count=args.top,
            posterior=args.posterior, title=f"Influence: {Path(args.run_dir).resolve().name}")
    print(f"report: {report}")
    return 0


def _texts(probe: ProbeSet, tokenizer: object | None) -> list[str]:
    ids, mask = probe.input_ids, probe.attention_mask
    return sequence_texts(ids.numpy(), None if mask is None else mask.numpy(), tokenizer)


def _check_saved(saved: InfluenceResult, path: Path, train: ProbeSet, queries: ProbeSet,
                 config: SGLDConfig, args: argparse.Namespace) -> None:
    """Refuse to continue a series computed with other data or settings."""
    differences = settings_differences(saved.config, config)
    for name, now in (("train_level", args.train_level), ("query_level", args.query_level)):
        if getattr(saved, name) != now:
            differences.append(f"{name}={getattr(saved, name)!r} (now {now!r})")
    if saved.extra.get("components") != args.components:
        differences.append(f"components={saved.extra.get('components')!r} (now "
                           f"{args.components!r})")
    for what, probe, ids in (("training data", train, saved.train_input_ids),
                             ("queries", queries, saved.query_input_ids)):
        if ids is None or not np.array_equal(ids, probe.input_ids.numpy()):
            differences.append(f"other {what}")
    if differences:
        raise CommandError(f"{path} was computed with {'; '.join(differences)}; {REMEDY}")


def add_influence_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("influence", help="influence matrix of every checkpoint, with "
                                                "a report")
    run.add_argument("run_dir", help="folder with checkpoint-<step> folders")
    run.add_argument("--train", required=True,
                     help="JSONL of the training sequences whose influence is measured")
    run.add_argument("--queries", required=True, help="JSONL of the query sequences")
    run.add_argument("--sampling-data", help="JSONL SGLD samples with (default: --train)")
    run.add_argument("--components", default=None,
                     help="also the restricted posteriors of these components, e.g. heads "
                          "(default: the full posterior alone)")
    run.add_argument("--train-level", choices=LEVELS, default="sequence")
    run.add_argument("--query-level", choices=LEVELS, default="sequence")
    run.add_argument("--top", type=int, default=5, help="training sequences per list")
    run.add_argument("--posterior", default="full", help="posterior the report shows")
    run.add_argument("--checkpoints", nargs="+", help="explicit checkpoint folders")
    run.add_argument("--tokenizer", help="tokenizer path or name (default: from the run)")
    run.add_argument("--max-length", type=int, default=None, help="truncate sequences")
    run.add_argument("--config", help="JSON file of SGLDConfig fields")
    for name, options in config_flags().items():
        run.add_argument(f"--{name.replace('_', '-')}", default=None, **options)
    run.add_argument("--force", action="store_true", help="recompute finished checkpoints")
    run.add_argument("--out", help="folder that receives influence/ (default RUN_DIR)")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(handler=influence)
