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

import susc_callback.cli.analyze as analyze_command
from susc_callback.analysis.compare import compare_results
from susc_callback.analysis.pca import STANDARDIZATIONS
from susc_callback.cli.calibrate import add_calibrate_command
from susc_callback.cli.common import CommandError, config_flags, load_tokenizer, skip_damaged
from susc_callback.cli.influence import add_influence_command
from susc_callback.cli.launch import end_if_launched
from susc_callback.clusters.stability import cluster_agreement
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.influence import InfluenceResult
from susc_callback.logging.cluster_figures import stability_figure
from susc_callback.logging.report import write_report
from susc_callback.sharding.collectives import PeerError
from susc_callback.store.files import is_result_folder
from susc_callback.store.run import (
    INFLUENCE_FOLDER,
    RunInUseError,
    RunStore,
    check_one_series,
    load_results,
    training_losses,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
    except (CommandError, PeerError, ValueError, OSError, RunInUseError) as error:
        print(f"susc {args.command}: error: {error}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        resumable = " (every finished checkpoint is saved: run the same command again to " \
                    "continue)" if args.command == "analyze" else ""
        print(f"\nsusc {args.command}: interrupted{resumable}", file=sys.stderr)
        status = 130
    end_if_launched(status)
    return status


# -- report and compare ----------------------------------------------------------------------

def report(args: argparse.Namespace) -> int:
    source = Path(args.path)
    results = load_results(source, skip_damaged if args.keep_going else None)
    check_one_series(results, "report one series at a time, or make the series whole with "
                              "susc analyze --force")
    out = Path(args.out) if args.out else (
        source.parent / f"{source.name}-report" if is_result_folder(source)
        else source / "report")
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, source, {})
    influence = RunStore.of_run(source, INFLUENCE_FOLDER, InfluenceResult).load_all(
        on_damaged=skip_damaged if args.keep_going else None)
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
    run.add_argument("--components", default=None, help="presets and/or component "
                     "names, e.g. heads,mlp or l0h3,l1.mlp (default: every attention head)")
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
    run.set_defaults(handler=analyze_command.analyze)

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
