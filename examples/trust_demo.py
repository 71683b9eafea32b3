"""How far to trust an estimate, on the induction demo's model.

Run the demo first (``python examples/induction_demo.py --quick``), then::

    python examples/trust_demo.py                       # the quick demo's last checkpoint
    python examples/trust_demo.py --run outputs/induction_demo_default --mode default
    python examples/trust_demo.py --step-sizes 1e-3 3e-3 --n-betas 30 --gammas 300 1000

1. ``calibrate`` at the last checkpoint: a sweep over step size x n_beta with short
   chains, every setting's diagnostics, a recommended setting and its burn-in
   (``RUN/trust/calibration.json``, ``recommended_config.json``, the traces figure).
2. One estimate with the recommended setting: its problems in words, the localisation
   share, split-half reliability.
3. Per layer, whether a top PC separates the circuit's heads (induction heads in layer 1,
   previous-token heads in layer 0, from their attention patterns) beyond chance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from head_scores import attention_scores
from induction_demo import MODES, THRESHOLD, build_data
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from susc_callback import SGLDConfig, estimate_susceptibilities
from susc_callback.analysis.diagnostics import snapshot_problems
from susc_callback.analysis.reliability import margin_significance, split_half_reliability
from susc_callback.calibration import calibrate
from susc_callback.logging.calibration_figure import save_calibration_figure
from susc_callback.store.run import find_checkpoints


def main() -> None:
    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("outputs/induction_demo_quick"))
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--cache", type=Path, default=Path("outputs/cache"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sizes", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--n-betas", type=float, nargs="+", default=[10.0, 30.0, 100.0])
    parser.add_argument("--gammas", type=float, nargs="+", default=None,
                        help="default: the config's (300)")
    parser.add_argument("--draws", type=int, default=60, help="draws per calibration chain")
    args = parser.parse_args()
    checkpoints = find_checkpoints(args.run, None)
    step, path = max(checkpoints.items())
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    tokenizer, train, probe = build_data(MODES[args.mode], args.seed, args.cache)
    out = args.run / "trust"
    base = SGLDConfig(num_chains=4, num_draws=100, batch_size=16, seed=args.seed)

    settings = len(args.step_sizes) * len(args.n_betas) * len(args.gammas or [base.gamma])
    print(f"1. calibrating at step {step} ({settings} settings, 2 chains x {args.draws} "
          "draws each)", flush=True)
    found = calibrate(model, train, probe, base, step_sizes=args.step_sizes,
                      n_betas=args.n_betas, gammas=args.gammas, components="heads",
                      num_draws=args.draws,
                      on_setting=lambda setting: print(f"   {setting.line()}", flush=True))
    found.save(out)
    save_calibration_figure(found, out / "calibration_traces.png")
    print(f"   {found.reason}")
    if found.recommended is None:
        return

    print("2. one estimate with the recommended setting", flush=True)
    result = estimate_susceptibilities(model, "heads", train, probe,
                                       found.recommended.replace(progress=False), step=step)
    for problem in snapshot_problems(result) or ["no problems"]:
        print(f"   {problem}")
    print(f"   localisation share: heads {np.nanmin(result.localisation):.0%} to "
          f"{np.nanmax(result.localisation):.0%}, full chain {result.full_localisation:.0%}")
    halves = split_half_reliability(result)
    print(f"   split-half r per head: median {np.median(halves.component_r):.3f} (whole "
          f"estimate about {np.median(halves.whole_estimate_r):.3f}); matrix "
          f"{halves.matrix_r:.3f}; PC loadings "
          + ", ".join(f"{r:.2f}" for r in halves.loadings_r))

    print("3. does a top PC separate the circuit's heads beyond chance?")
    scores = attention_scores(model, len(tokenizer))
    groups = {0: ("previous-token", scores["previous_token"][0]),
              1: ("induction", scores["prefix_matching"][1])}
    for layer, (kind, values) in groups.items():
        names = [f"l{layer}h{h}" for h in range(len(values))]
        group = {n for n, v in zip(names, values) if v >= THRESHOLD}
        if not 0 < len(group) < len(names):
            print(f"   layer {layer}: {len(group)} {kind} heads - nothing to separate")
            continue
        test = margin_significance(result.subset(names), group)
        print(f"   layer {layer}: {kind} heads {sorted(group)} on PC{test.pc + 1}: margin "
              f"{test.margin:+.2f}, p = {test.p_value:.3f} (of {len(test.null_margins)} "
              f"groups), halves {test.half_margins[0]:+.2f} / {test.half_margins[1]:+.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
