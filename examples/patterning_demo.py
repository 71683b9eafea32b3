"""Steer when induction heads form by reweighting the training data from the susceptibilities.

    python examples/patterning_demo.py --quick        # a smoke run of the mechanics
    python examples/patterning_demo.py                # 3 runs of 2000 steps
    python examples/patterning_demo.py --seeds 0 1    # the same with two seeds

The model, corpus and tokenizer are the induction demo's (``induction_demo.py``). The
training pool is labelled by dataset: code, prose and legal text from this Python
installation, and random spans repeated with a period of 8-40 (``induction``), which only
induction heads can predict. Three runs from one initialisation and one data order:

* control: no reweighting;
* accelerate: ``PatterningCallback`` aims to *raise* the layer-1 heads' coordinates
  ``E_C[phi]`` (``rLLC / n_beta``);
* delay: it aims to *lower* them.

The sign is the one seeds 1 and 2 showed with these settings (``docs/patterning.md``):
raising the coordinates up-weighted the induction data over the first 1000 steps,
lowering them down-weighted it; seeds 3 and 4 test it.

Every ``replan`` steps the callback estimates the layer-1 heads' susceptibilities on a
probe of each dataset. It re-plans one loss weight per dataset (``granularity="dataset"``,
ridge inverse, largest change ``--max-change``), averages it with the weights applied
before (``--smoothing``) and puts the weights into the pool.
``HeadScoresCallback`` measures the second-copy loss of repeated random sequences. The
script reports the first step at which that loss falls below half its value at step 0,
per run and seed, and the predicted and realised coordinate changes. It writes
``patterning.json`` and a figure. docs/patterning.md reports what the seeds gave.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from corpus import build_corpus, repeated_sequences, token_windows, train_tokenizer
from head_scores import HeadScoresCallback
from matplotlib.figure import Figure
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator
from transformers.utils import logging as hf_logging

from susc_callback import ProbeSet, Schedule, SGLDConfig, head_components
from susc_callback.patterning.callback import PatterningCallback
from susc_callback.patterning.training import PatternedTrainer, WeightedPool

CONTEXT, VOCAB_SIZE = 64, 512
HEADS = [f"l1h{i}" for i in range(8)]
DOMAINS = ("code", "prose", "legal")


@dataclass(frozen=True)
class Mode:
    steps: int
    replan: int
    pool: int  # training sequences (half natural text, half repeated)
    probe_per_dataset: int
    draws: int


MODES = {"quick": Mode(steps=300, replan=100, pool=2048, probe_per_dataset=4, draws=10),
         "default": Mode(steps=2000, replan=200, pool=32768, probe_per_dataset=8, draws=40)}


def build_pool(mode: Mode, seed: int, cache: Path):
    """The labelled training pool and a probe of each dataset, both from held-apart text."""
    corpus = build_corpus(seed)
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE, cache)
    generator = torch.Generator().manual_seed(seed)
    half = mode.pool // 2
    shares = {"code": half // 2, "prose": half // 4, "legal": half - half // 2 - half // 4}
    parts = {d: token_windows(corpus.train[d], tokenizer, CONTEXT, n, generator)
             for d, n in shares.items()}
    parts["induction"] = repeated_sequences(half, CONTEXT, len(tokenizer), generator)
    labels = [d for d, ids in parts.items() for _ in range(len(ids))]
    ids = torch.cat(list(parts.values()))
    order = torch.randperm(len(ids), generator=generator)
    n = mode.probe_per_dataset
    probe_parts = {d: token_windows(corpus.held_out[d], tokenizer, CONTEXT, n, generator)
                   for d in DOMAINS}
    probe_parts["induction"] = repeated_sequences(n, CONTEXT, len(tokenizer), generator)
    probe = ProbeSet.from_tensors(torch.cat(list(probe_parts.values())),
                                  datasets=[d for d, p in probe_parts.items() for _ in p])
    return tokenizer, ids[order], [labels[i] for i in order], probe


def run(name: str, mode: Mode, seed: int, out: Path, data, options: argparse.Namespace
        ) -> dict:
    tokenizer, ids, labels, probe = data
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_head=8, n_embd=128, n_positions=CONTEXT, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    pool = WeightedPool({"input_ids": ids})
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / name / "runs")  # the loss goes here
    heads = HeadScoresCallback(Schedule(every=max(1, mode.steps // 40), at_start=True,
                                        at_end=True), len(tokenizer), out / name / "runs")
    args = TrainingArguments(
        output_dir=str(out / name), max_steps=mode.steps, per_device_train_batch_size=32,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=50,
        save_strategy="no", report_to="tensorboard",
        use_cpu=not torch.cuda.is_available(), seed=seed, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = PatternedTrainer(model=model, args=args, train_dataset=pool,
                               data_collator=default_data_collator, callbacks=[heads])
    patterning = None
    if name != "control":
        sign = 1.0 if name == "accelerate" else -1.0
        patterning = PatterningCallback(
            pool, {head: sign for head in HEADS},
            components=[c for c in head_components(model) if c.name in HEADS],
            schedule=Schedule(every=mode.replan, at_start=True), probe=probe,
            pool_datasets=labels, sampling_data={"input_ids": ids[:4096]},
            plan_options={"granularity": "dataset", "max_change": options.max_change},
            smoothing=options.smoothing,
            config=SGLDConfig(num_chains=options.chains, num_draws=mode.draws, batch_size=16,
                              observable_sequences=16, seed=seed, progress=False))
        patterning.bind(trainer)
    trainer.train()
    return summarize(heads.history, patterning)


def summarize(history: dict, patterning: PatterningCallback | None) -> dict:
    steps = sorted(history)
    loss = [float(history[s]["second_copy_loss"]) for s in steps]
    threshold = loss[0] / 2
    crossing = next((s for s, v in zip(steps, loss) if v < threshold), None)
    summary = {"steps": steps, "second_copy_loss": loss, "threshold": threshold,
               "first_step_below_threshold": crossing,
               "prefix_matching_l1": [history[s]["prefix_matching"][1].tolist() for s in steps]}
    if patterning is not None:
        summary["replans"] = [
            {"step": h.step, "weights": dict(zip(h.plan.groups, h.plan.weights.tolist())),
             "applied": h.applied,
             "predicted": dict(zip(h.plan.component_names, h.plan.predicted.tolist())),
             "realised_since_previous": h.realised} for h in patterning.history_]
    return summary


def first_interval_correlation(summary: dict) -> float | None:
    """Correlation over the layer-1 heads of the change predicted at the first re-plan and
    the change realised by the second."""
    replans = summary.get("replans", [])
    if len(replans) < 2 or replans[1]["realised_since_previous"] is None:
        return None
    predicted = np.array([replans[0]["predicted"][h] for h in HEADS])
    realised = np.array([replans[1]["realised_since_previous"][h] for h in HEADS])
    return float(np.corrcoef(predicted, realised)[0, 1])


def figure(results: dict, path: Path) -> None:
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    loss_axes, score_axes = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    seeds = sorted({seed for seed, _ in results})
    for (seed, name), summary in results.items():
        style = {"linestyle": styles[seeds.index(seed) % len(styles)],
                 "color": {"control": "black", "accelerate": "tab:green",
                           "delay": "tab:red"}[name]}
        loss_axes.plot(summary["steps"], summary["second_copy_loss"],
                       label=f"{name} (seed {seed})", **style)
        score_axes.plot(summary["steps"], np.max(summary["prefix_matching_l1"], axis=1),
                        **style)
    loss_axes.set_ylabel("second-copy loss")
    score_axes.set_ylabel("largest prefix-matching score, layer-1 heads")
    for axes in (loss_axes, score_axes):
        axes.set_xlabel("training step")
    fig.suptitle("Induction under patterning", fontsize=10)
    fig.legend(fontsize=8, loc="outside right upper")
    fig.savefig(path, dpi=110)


def main() -> None:
    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-change", type=float, default=0.9,
                        help="largest change of a dataset's loss weight (weights 1 +- this)")
    parser.add_argument("--smoothing", type=float, default=0.5,
                        help="weight of the previous weights when a re-plan is applied")
    parser.add_argument("--chains", type=int, default=2, help="SGLD chains per re-plan")
    parser.add_argument("--draws", type=int, default=None, help="draws per chain per re-plan")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--runs", nargs="+", default=["control", "accelerate", "delay"],
                        choices=["control", "accelerate", "delay"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path("outputs/cache"))
    args = parser.parse_args()
    mode = MODES["quick" if args.quick else "default"]
    if args.draws is not None:
        mode = replace(mode, draws=args.draws)
    if args.steps is not None:
        mode = replace(mode, steps=args.steps)
    out = args.out or Path("outputs") / f"patterning_demo_{'quick' if args.quick else 'default'}"
    results = {}
    for seed in args.seeds:
        data = build_pool(mode, seed, args.cache)
        for name in args.runs:
            results[(seed, name)] = summary = run(name, mode, seed, out / f"seed{seed}", data,
                                                  args)
            print(f"seed {seed} {name:10s}: second-copy loss below {summary['threshold']:.2f} "
                  f"first at step {summary['first_step_below_threshold']}"
                  + (f"; first-interval corr(predicted, realised) "
                     f"{first_interval_correlation(summary)}" if name != "control" else ""),
                  flush=True)
    (out / "patterning.json").write_text(json.dumps(
        {f"seed{s}/{n}": v for (s, n), v in results.items()}, indent=1))
    figure(results, out / "second_copy_loss.png")
    print(f"results: {out / 'patterning.json'}\nfigure:  {out / 'second_copy_loss.png'}")


if __name__ == "__main__":
    main()
