"""``susc``: analyse a saved checkpoint series, render reports, compare results.

    susc analyze RUN_DIR --probe probe.jsonl --sampling-data train.jsonl [options]
    susc report RESULT_OR_RUN_DIR [--out DIR]
    susc compare RESULT_A RESULT_B
    susc influence RUN_DIR --train train.jsonl --queries queries.jsonl [options]
    susc calibrate CHECKPOINT --sampling-data train.jsonl --out DIR [options]

``analyze`` writes ``RUN_DIR/susceptibility/step-{N}`` (the callback's layout, so a run
analysed partly live and partly afterwards is one series), skips finished checkpoints
unless ``--force`` and continues an interrupted run where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers.utils import logging as hf_logging

from susc_callback.analysis.compare import compare_results
from susc_callback.analysis.pca import STANDARDIZATIONS
from susc_callback.cli.calibrate import add_calibrate_command
from susc_callback.cli.common import (
    CommandError,
    announce_saved,
    announce_start,
    config_flags,
    load_model,
    load_tokenizer,
    sgld_config,
)
from susc_callback.cli.influence import add_influence_command
from susc_callback.clusters.stability import cluster_agreement
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet, probe_token_texts
from susc_callback.estimator.engine import ChainDivergedError, estimate_susceptibilities
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.influence import InfluenceResult
from susc_callback.logging.cluster_figures import stability_figure
from susc_callback.logging.report import write_report
from susc_callback.logging.snapshots import SnapshotPublisher
from susc_callback.store.files import ResultFileError, is_result_folder
from susc_callback.store.run import (
    INFLUENCE_FOLDER,
    RunInUseError,
    RunStore,
    check_one_series,
    check_same_probe,
    check_same_settings,
    default_log_dir,
    find_checkpoints,
    load_results,
    training_losses,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, ValueError, OSError, RunInUseError) as error:
        print(f"susc {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = " (every finished checkpoint is saved: run the same command again to " \
                    "continue)" if args.command == "analyze" else ""
        print(f"\nsusc {args.command}: interrupted{resumable}", file=sys.stderr)
        return 130


# -- analyze ---------------------------------------------------------------------------------

SERIES_REMEDY = ("use the same flags, --force to recompute every checkpoint of the series, or "
                 "--out DIR to start a new series")


def analyze(args: argparse.Namespace) -> int:
    checkpoints = find_checkpoints(args.run_dir, args.checkpoints)
    out = Path(args.out) if args.out else Path(args.run_dir)
    store = RunStore.of_run(out)
    with store.writing():  # one analysis of a run at a time
        return _analyze(args, store, checkpoints, out)


def _analyze(args: argparse.Namespace, store: RunStore, checkpoints: dict[int, Path],
             out: Path) -> int:
    """Estimate every checkpoint without a result, then rebuild the TensorBoard run."""
    if args.no_progress or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars
    tokenizer = load_tokenizer(args.tokenizer, Path(args.run_dir), checkpoints)
    probe = ProbeSet.from_jsonl(args.probe, tokenizer, max_length=args.max_length)
    sampling = ProbeSet.from_jsonl(args.sampling_data, tokenizer, max_length=args.max_length,
                                   what="sampling data")
    config = sgld_config(args)
    components = args.components or "heads"
    probe_texts = probe_token_texts(probe, tokenizer)
    todo = _steps_to_compute(store, checkpoints, args, config, components, probe)
    failures = []
    for index, (step, path) in enumerate(checkpoints.items(), 1):
        if step not in todo:
            print(f"step {step}: done already ({store.step_dir(step)})")
            continue
        start = announce_start(step, index, len(checkpoints))
        try:
            model = load_model(path, tokenizer)
            result = estimate_susceptibilities(model, components, sampling.tensors, probe,
                                               config, step=step)
        except (CommandError, ChainDivergedError) as error:
            if not args.keep_going:
                raise CommandError(str(error)) from error
            failures.append(f"{path.name}: {error}")
            print(f"step {step}: skipped, {error}", file=sys.stderr)
            continue
        except ValueError as error:
            raise CommandError(f"{path}: {error}") from error
        result.extra.update(checkpoint=str(path), components=components,
                            probe_tokens=probe_texts)
        announce_saved(step, store.save(result), start)
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir(out)
    publisher = SnapshotPublisher(store, log_dir, args.n_pcs, args.standardization)
    try:
        publisher.rebuild(_skip_damaged if args.keep_going else None)
    finally:
        publisher.close()
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    if failures:
        print("failed checkpoints:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _steps_to_compute(store: RunStore, checkpoints: dict[int, Path], args: argparse.Namespace,
                      config: SGLDConfig, components: str, probe: ProbeSet) -> set[int]:
    """The checkpoints to estimate. Every saved result that stays in the series is checked
    against this analysis first, so that nothing is computed for a series that would then
    be refused; a damaged one is computed again when its checkpoint is at hand."""
    todo = set(checkpoints) if args.force else set()
    for step, path in store.saved_steps().items():
        if step in todo:
            continue
        try:
            _check_saved(store.load(step), path, config, components, probe)
        except ResultFileError as error:
            if step not in checkpoints:
                if args.keep_going:
                    continue  # left out of the TensorBoard run, named there
                raise CommandError(f"{error} (no checkpoint-{step} to compute it again "
                                   "from; --keep-going leaves it out)") from error
            print(f"step {step}: saved result is damaged ({error.problem}); recomputing",
                  file=sys.stderr)
            todo.add(step)
    return todo | {step for step in checkpoints if not store.has(step)}


def _check_saved(saved: SusceptibilityResult, path: Path, config: SGLDConfig, components: str,
                 probe: ProbeSet) -> None:
    check_same_settings(saved, config, saved.component_names, path, SERIES_REMEDY)
    if saved.extra.get("components") not in (None, components):
        raise CommandError(f"{path} holds components {saved.extra['components']!r}, not "
                           f"{components!r}; {SERIES_REMEDY}")
    check_same_probe(saved, probe.input_ids.numpy(), path, SERIES_REMEDY)


# -- report and compare ----------------------------------------------------------------------

def _skip_damaged(step: int, error: ResultFileError) -> None:
    print(f"step {step}: skipped, {error}", file=sys.stderr)


def report(args: argparse.Namespace) -> int:
    source = Path(args.path)
    results = load_results(source, _skip_damaged if args.keep_going else None)
    check_one_series(results, "report one series at a time, or make the series whole with "
                              "susc analyze --force")
    out = Path(args.out) if args.out else (
        source.parent / f"{source.name}-report" if is_result_folder(source)
        else source / "report")
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, source, {})
    influence = RunStore.of_run(source, INFLUENCE_FOLDER, InfluenceResult).load_all(
        on_damaged=_skip_damaged if args.keep_going else None)
    path = write_report(results, out, tokenizer=tokenizer, step=args.step, n_pcs=args.n_pcs,
                        standardization=args.standardization,
                        title=f"Susceptibilities: {source.resolve().name}",
                        training_loss=training_losses(source), influence=influence)
    print(f"report: {path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    a = SusceptibilityResult.load(args.a)
    b = SusceptibilityResult.load(args.b)
    correlations = compare_results(a, b)
    print(f"{'component':<16}{'pearson r':>10}")
    for name, value in correlations.items():
        print(f"{name:<16}{value:>10.4f}")
    values = np.array([v for v in correlations.values() if np.isfinite(v)])
    if len(values):
        print(f"{'mean':<16}{values.mean():>10.4f}  (min {values.min():.4f}, "
              f"{len(values)} components)")
    try:
        agreement = cluster_agreement(a, b)
    except ValueError as error:
        print(f"token clusters: not compared ({error})")
        return 0
    print(f"token clusters: adjusted Rand index {agreement.ari:.3f} ({len(agreement.sizes)} "
          f"clusters in A; best Jaccard overlap with a cluster of B, largest first: "
          + ", ".join(f"{v:.2f}" for v in agreement.best_jaccard[np.argsort(-agreement.sizes)])
          + ")")
    if args.figure:
        stability_figure(agreement).savefig(args.figure, dpi=110)
        print(f"figure: {args.figure}")
    return 0


# -- parser ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="susc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("analyze", help="estimate susceptibilities of every checkpoint")
    run.add_argument("run_dir", help="folder with checkpoint-<step> folders")
    run.add_argument("--probe", required=True, help="probe JSONL (text or input_ids, dataset)")
    run.add_argument("--sampling-data", required=True,
                     help="JSONL of sampling sequences, same format as the probe")
    run.add_argument("--checkpoints", nargs="+", help="explicit checkpoint folders")
    run.add_argument("--tokenizer", help="tokenizer path or name (default: from the run)")
    run.add_argument("--max-length", type=int, default=None, help="truncate sequences")
    run.add_argument("--components", default=None, help="preset(s), e.g. heads,mlp "
                     "(default: every attention head)")
    run.add_argument("--config", help="JSON file of SGLDConfig fields")
    for name, options in config_flags().items():
        run.add_argument(f"--{name.replace('_', '-')}", default=None, **options)
    run.add_argument("--force", action="store_true", help="recompute finished checkpoints")
    run.add_argument("--out", help="folder that receives susceptibility/ and runs/ "
                                   "(default RUN_DIR): a new series beside the run's")
    run.add_argument("--keep-going", action="store_true",
                     help="skip unreadable checkpoints and damaged saved results instead of "
                          "stopping")
    run.add_argument("--log-dir", help="TensorBoard run (default RUN_DIR/runs/susceptibility)")
    run.add_argument("--no-progress", action="store_true")
    _analysis_options(run)
    run.set_defaults(handler=analyze)

    show = commands.add_parser("report", help="render an HTML report of saved results")
    show.add_argument("path", help="a result folder, a run folder or a susceptibility folder")
    show.add_argument("--out", help="output folder (default: next to the results)")
    show.add_argument("--tokenizer", help="decode token ids when the results hold no text")
    show.add_argument("--step", type=int, help="snapshot of the token view (default: last)")
    show.add_argument("--keep-going", action="store_true",
                      help="leave damaged results out of the series (each named) instead of "
                           "stopping")
    _analysis_options(show)
    show.set_defaults(handler=report)

    pair = commands.add_parser("compare", help="correlate two results per component")
    pair.add_argument("a")
    pair.add_argument("b")
    pair.add_argument("--figure", help="write the cluster stability figure (PNG) here")
    pair.set_defaults(handler=compare)
    add_influence_command(commands)
    add_calibrate_command(commands)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-pcs", type=_positive_int, default=3)
    parser.add_argument("--standardization", choices=STANDARDIZATIONS,
                        default="structural-inference")


if __name__ == "__main__":
    sys.exit(main())
