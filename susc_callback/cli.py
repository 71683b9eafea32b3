"""``susc``: analyse a saved checkpoint series, render reports, compare results.

    susc analyze RUN_DIR --probe probe.jsonl --sampling-data train.jsonl [options]
    susc report RESULT_OR_RUN_DIR [--out DIR]
    susc compare RESULT_A RESULT_B

``analyze`` writes ``RUN_DIR/susceptibility/step-{N}`` (the callback's layout, so a run
analysed partly live and partly afterwards is one series), skips finished checkpoints
unless ``--force`` and continues an interrupted run where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from susc_callback.analysis.pca import STANDARDIZATIONS, compare_results
from susc_callback.analysis.series import SnapshotSeries, check_same_settings, saved_steps, step_dir
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet, probe_token_texts
from susc_callback.estimator.engine import ChainDivergedError, estimate_susceptibilities
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.report import write_report
from susc_callback.logging.tensorboard import (
    TensorBoardLogger,
    drop_events_after,
    remove_projector,
    snapshot_scalars,
)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_SGLD_FLAGS = {"step_size": float, "n_beta": float, "gamma": float, "num_chains": int,
               "num_draws": int, "num_burnin": int, "steps_between_draws": int,
               "batch_size": int, "observable_sequences": int, "eval_batch_size": int,
               "seed": int}


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"susc {args.command}: error: {error}", file=sys.stderr)
        return 2


# -- analyze ---------------------------------------------------------------------------------

def analyze(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    checkpoints = find_checkpoints(run_dir, args.checkpoints)
    tokenizer = _load_tokenizer(args.tokenizer, run_dir, checkpoints)
    probe = read_sequences(args.probe, tokenizer, args.max_length, "probe")
    sampling = read_sequences(args.sampling_data, tokenizer, args.max_length, "sampling data")
    config = _config(args)
    components = args.components or "heads"
    probe_texts = probe_token_texts(probe, tokenizer)
    results_dir = run_dir / "susceptibility"
    failures = []
    for step, path in tqdm(checkpoints.items(), desc="checkpoints", unit="ckpt",
                           disable=not sys.stderr.isatty()):
        target = step_dir(results_dir, step)
        if target.is_dir() and (target / "meta.json").is_file() and not args.force:
            _check_saved(target, config, components, probe)
            print(f"step {step}: done already ({target})")
            continue
        try:
            model = _load_model(path, tokenizer)
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
        result.save(target)
        print(f"step {step}: saved {target}")
    _write_tensorboard(results_dir, Path(args.log_dir) if args.log_dir else
                       run_dir / "runs" / "susceptibility", args.n_pcs, args.standardization)
    if failures:
        print("failed checkpoints:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def find_checkpoints(run_dir: Path, explicit: list[str] | None) -> dict[int, Path]:
    """``{step: checkpoint folder}`` in step order, from ``checkpoint-*`` or a given list."""
    if explicit:
        found = {}
        for name in explicit:
            path = Path(name) if Path(name).is_dir() else run_dir / name
            if not path.is_dir():
                raise CommandError(f"checkpoint {name} not found (looked in {path})")
            found[_checkpoint_step(path)] = path
        return dict(sorted(found.items()))
    if not run_dir.is_dir():
        raise CommandError(f"run directory {run_dir} does not exist")
    found = {int(m.group(1)): p for p in run_dir.iterdir()
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))}
    if not found:
        raise CommandError(f"no checkpoints found: looked for checkpoint-<step> folders in "
                           f"{run_dir.resolve()}; pass --checkpoints to name them")
    return dict(sorted(found.items()))


def read_sequences(path: str, tokenizer: object | None, max_length: int | None,
                   what: str) -> ProbeSet:
    """Sequences from a JSONL file: one ``{"text": ..., "dataset": ...}`` or
    ``{"input_ids": [...], "dataset": ...}`` per line (dataset optional)."""
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{what} file {path} not found")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(row, dict) or ("text" in row) == ("input_ids" in row):
            raise CommandError(f"{path}:{number}: expected an object with either 'text' or "
                               "'input_ids'")
        rows.append(row)
    if not rows:
        raise CommandError(f"{what} file {path} holds no sequences")
    datasets = [str(row.get("dataset", "probe")) for row in rows]
    if all("text" in row for row in rows):
        if tokenizer is None:
            raise CommandError(f"{what} {path} holds text: pass --tokenizer (or save the "
                               "tokenizer with the checkpoints)")
        return ProbeSet.from_texts([row["text"] for row in rows], tokenizer, datasets,
                                   max_length=max_length)
    if not all("input_ids" in row for row in rows):
        raise CommandError(f"{path}: mix of 'text' and 'input_ids' rows; use one kind")
    length = max(len(row["input_ids"]) for row in rows)
    if max_length:
        length = min(length, max_length)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = torch.as_tensor(row["input_ids"][:length], dtype=torch.long)
        ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
    return ProbeSet.from_tensors(ids, mask, datasets)


def _checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT.match(path.name)
    if match:
        return int(match.group(1))
    state = path / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    raise CommandError(f"cannot tell the training step of {path}: name it checkpoint-<step> "
                       "or keep its trainer_state.json")


def _load_tokenizer(name: str | None, run_dir: Path, checkpoints: dict[int, Path]) -> object:
    from transformers import AutoTokenizer

    candidates = [name] if name else [run_dir, *checkpoints.values()]
    for candidate in candidates:
        try:
            return AutoTokenizer.from_pretrained(str(candidate))
        except Exception as error:  # noqa: BLE001 - try the next place, report if named
            if name:
                raise CommandError(f"cannot load tokenizer {name}: {error}") from error
    return None


def _load_model(path: Path, tokenizer: object | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    except Exception as error:
        raise CommandError(f"checkpoint {path} is unreadable: {error}") from error
    vocab = getattr(model.config, "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise CommandError(f"the tokenizer has {len(tokenizer)} tokens but {path.name}'s model "
                           f"has a vocabulary of {vocab}: mismatched tokenizer")
    return model.eval()


def _config(args: argparse.Namespace) -> SGLDConfig:
    values = json.loads(Path(args.config).read_text()) if args.config else {}
    values.update({k: getattr(args, k) for k in _SGLD_FLAGS if getattr(args, k) is not None})
    values["progress"] = False if args.no_progress else None
    values.setdefault("on_divergence", "mark")  # a diverged head is saved as failed
    if args.device:
        values["device"] = args.device
    return SGLDConfig.from_dict(values)


def _check_saved(target: Path, config: SGLDConfig, components: str, probe: ProbeSet) -> None:
    saved = SusceptibilityResult.load(target)
    check_same_settings(saved, config, saved.component_names, target)
    if saved.extra.get("components") not in (None, components):
        raise CommandError(f"{target} holds components {saved.extra['components']!r}, not "
                           f"{components!r}; use --force to recompute the series")
    if not np.array_equal(saved.probe_input_ids, probe.input_ids.numpy()):
        raise CommandError(f"{target} was computed on another probe set; use --force to "
                           "recompute the series")


def _write_tensorboard(results_dir: Path, log_dir: Path, n_pcs: int,
                       standardization: str) -> None:
    """Rebuild the analysis's TensorBoard run from every saved result (idempotent)."""
    drop_events_after(log_dir, None)
    remove_projector(log_dir)
    logger, series = TensorBoardLogger(log_dir), SnapshotSeries(n_pcs, standardization)
    try:
        for path in saved_steps(results_dir).values():
            result = SusceptibilityResult.load(path)
            pca = series.add(result)
            logger.log_snapshot(result, pca, series, snapshot_scalars(result, pca))
    finally:
        logger.close()
    print(f"TensorBoard: tensorboard --logdir {log_dir}")


# -- report and compare ----------------------------------------------------------------------

def report(args: argparse.Namespace) -> int:
    source = Path(args.path)
    results = load_results(source)
    out = Path(args.out) if args.out else (source / "report" if (source / "susceptibility")
                                           .is_dir() or not (source / "meta.json").is_file()
                                           else source.parent / f"{source.name}-report")
    tokenizer = None
    if args.tokenizer:
        tokenizer = _load_tokenizer(args.tokenizer, source, {})
    path = write_report(results, out, tokenizer=tokenizer, step=args.step, n_pcs=args.n_pcs,
                        standardization=args.standardization,
                        title=f"Susceptibilities: {source.resolve().name}")
    print(f"report: {path}")
    return 0


def load_results(source: Path) -> list[SusceptibilityResult]:
    """One saved result, or every snapshot of a run (``RUN/susceptibility/step-*``) or of a
    results folder (``.../susceptibility``)."""
    for single in (source, source / "susceptibility"):  # a result, or a checkpoint's copy
        if (single / "meta.json").is_file():
            return [SusceptibilityResult.load(single)]
    for root in (source / "susceptibility", source):
        steps = saved_steps(root)
        if steps:
            return [SusceptibilityResult.load(p) for p in steps.values()]
    raise CommandError(f"no saved results in {source} (looked for meta.json, "
                       f"{source / 'susceptibility'}/step-* and {source}/step-*)")


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
    for name, kind in _SGLD_FLAGS.items():
        run.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                         help=f"SGLDConfig.{name}")
    run.add_argument("--device", help="e.g. cuda or cpu (default: the model's)")
    run.add_argument("--force", action="store_true", help="recompute finished checkpoints")
    run.add_argument("--keep-going", action="store_true",
                     help="skip unreadable checkpoints instead of stopping")
    run.add_argument("--log-dir", help="TensorBoard run (default RUN_DIR/runs/susceptibility)")
    run.add_argument("--no-progress", action="store_true")
    _analysis_options(run)
    run.set_defaults(handler=analyze)

    show = commands.add_parser("report", help="render an HTML report of saved results")
    show.add_argument("path", help="a result folder, a run folder or a susceptibility folder")
    show.add_argument("--out", help="output folder (default: next to the results)")
    show.add_argument("--tokenizer", help="decode token ids when the results hold no text")
    show.add_argument("--step", type=int, help="snapshot of the token view (default: last)")
    _analysis_options(show)
    show.set_defaults(handler=report)

    pair = commands.add_parser("compare", help="correlate two results per component")
    pair.add_argument("a")
    pair.add_argument("b")
    pair.set_defaults(handler=compare)
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
