"""``susc calibrate``: a short sweep of SGLD settings at one checkpoint and a recommended
setting.

    susc calibrate CHECKPOINT --sampling-data data.jsonl [--probe probe.jsonl] --out DIR

Writes ``DIR/calibration.json`` (every setting's diagnostics and the reason for the
choice), ``DIR/recommended_config.json`` (for ``susc analyze --config`` and
``SGLDConfig.from_json``) and ``DIR/calibration_traces.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from susc_callback.calibration import calibrate
from susc_callback.cli.common import (
    CommandError,
    config_flags,
    load_model,
    load_tokenizer,
    sgld_config,
)
from susc_callback.data.probes import ProbeSet
from susc_callback.logging.calibration_figure import save_calibration_figure

PROBE_SEQUENCES = 8  # without --probe: this many sampling sequences are the probe


def calibrate_command(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer, checkpoint, {0: checkpoint})
    sampling = ProbeSet.from_jsonl(args.sampling_data, tokenizer, max_length=args.max_length,
                                   what="sampling data")
    probe = ProbeSet.from_jsonl(args.probe, tokenizer, max_length=args.max_length) \
        if args.probe else ProbeSet.from_batch(
            {key: value[:PROBE_SEQUENCES] for key, value in sampling.tensors.items()})
    model = load_model(checkpoint, tokenizer)
    try:
        found = calibrate(model, sampling.tensors, probe, sgld_config(args),
                          step_sizes=args.step_sizes, n_betas=args.n_betas, gammas=args.gammas,
                          components=args.components, num_chains=args.chains,
                          num_draws=args.draws,
                          on_setting=lambda setting: print(setting.line(), flush=True))
    except ValueError as error:
        raise CommandError(f"{checkpoint}: {error}") from error
    out = found.save(args.out)
    figure = save_calibration_figure(found, out / "calibration_traces.png")
    print(found.reason)
    print(f"wrote {out / 'calibration.json'} and {figure}")
    if found.recommended is None:
        return 1
    print(f"use it: susc analyze RUN --config {out / 'recommended_config.json'} ...")
    return 0


def add_calibrate_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("calibrate", help="sweep SGLD settings at one checkpoint and "
                                                "recommend one")
    run.add_argument("checkpoint", help="a checkpoint folder (from_pretrained)")
    run.add_argument("--sampling-data", required=True, help="JSONL of sampling sequences")
    run.add_argument("--probe", help=f"probe JSONL (default: the first {PROBE_SEQUENCES} "
                                     "sampling sequences)")
    run.add_argument("--out", required=True, help="folder for the calibration files")
    run.add_argument("--step-sizes", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    run.add_argument("--n-betas", type=float, nargs="+", default=[10.0, 30.0, 100.0])
    run.add_argument("--gammas", type=float, nargs="+", default=None,
                     help="default: the config's gamma")
    run.add_argument("--chains", type=int, default=2, help="chains per setting")
    run.add_argument("--draws", type=int, default=100, help="draws per chain and setting")
    run.add_argument("--components", default=None, help="preset(s) (default: heads)")
    run.add_argument("--tokenizer", help="tokenizer path or name (default: the checkpoint's)")
    run.add_argument("--max-length", type=int, default=None, help="truncate sequences")
    run.add_argument("--config", help="JSON file of SGLDConfig fields (the base setting)")
    for name, options in config_flags().items():
        run.add_argument(f"--{name.replace('_', '-')}", default=None, **options)
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(handler=calibrate_command)
