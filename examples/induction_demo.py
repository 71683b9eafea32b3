"""Train a 2-layer, 8-head GPT-2 on real local text and watch induction heads appear.

    python examples/induction_demo.py --quick     # about 2 min on an idle 2-core machine
    python examples/induction_demo.py             # the documented run: 11-16 min on 2 cores
    python examples/induction_demo.py --full      # a GPU: more steps, chains and draws

The corpus is built from this Python installation (``corpus.py``: stdlib code, language
reference prose, licence texts) plus random token spans repeated with a period of 8-40,
which only induction can predict. ``SusceptibilityCallback`` estimates every head's
susceptibilities on a log-spaced schedule; ``HeadScoresCallback`` logs an independent check
(prefix-matching and previous-token attention scores). At the end the script measures
whether a top principal component separates the induction circuit, writes
``findings.json`` and the HTML report, and prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from corpus import build_corpus, repeated_sequences, token_windows, train_tokenizer
from findings import cluster_findings, pc_separation, tag_scores
from head_scores import HeadScoresCallback
from toy_data import LanguageModelingData
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.utils import logging as hf_logging

from susc_callback import (
    ProbeSet,
    Schedule,
    SGLDConfig,
    SusceptibilityCallback,
    estimate_susceptibilities,
)
from susc_callback.clusters import tag_tokens
from susc_callback.logging.report import write_report
from susc_callback.store.run import load_results, training_losses

CONTEXT, VOCAB_SIZE, THRESHOLD = 64, 512, 0.3
SCOPES = ("whole_model", "layer0", "layer1", "layer0_spectroscopy", "layer1_spectroscopy")
"""Where separation is measured: structural-inference PCA of the whole model and of each
layer's heads, and spectroscopy PCA of each layer's heads."""


@dataclass(frozen=True)
class Mode:
    steps: int
    snapshots: int  # log-spaced, plus step 0 and the end
    every: int | None  # plus a snapshot every this many steps (induction forms mid-run)
    chains: int
    draws: int
    probe_per_domain: int
    train_windows: int


MODES = {"quick": Mode(steps=900, snapshots=3, every=None, chains=1, draws=20,
                       probe_per_domain=4, train_windows=8192),
         "default": Mode(steps=2500, snapshots=6, every=500, chains=2, draws=30,
                         probe_per_domain=8, train_windows=32768),
         "full": Mode(steps=6000, snapshots=16, every=250, chains=4, draws=100,
                      probe_per_domain=32, train_windows=131072)}


def natural_windows(texts: dict[str, list[str]], tokenizer, count: int,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Half code, a quarter each prose and legal."""
    shares = {"code": count // 2, "prose": count // 4, "legal": count - count // 2 - count // 4}
    return {d: token_windows(texts[d], tokenizer, CONTEXT, n, generator)
            for d, n in shares.items()}


def build_data(mode: Mode, seed: int, cache: Path):
    corpus = build_corpus(seed)
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE, cache)
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    half = mode.train_windows // 2
    natural = torch.cat(list(natural_windows(corpus.train, tokenizer, half, generator).values()))
    train = torch.cat([natural, repeated_sequences(half, CONTEXT, vocab, generator)])
    train = train[torch.randperm(len(train), generator=generator)]
    n = mode.probe_per_domain
    probe_parts = {d: token_windows(corpus.held_out[d], tokenizer, CONTEXT, n, generator)
                   for d in ("code", "prose", "legal")}
    probe_parts["induction"] = repeated_sequences(n, CONTEXT, vocab, generator)
    probe = ProbeSet.from_tensors(torch.cat(list(probe_parts.values())),
                                  datasets=[d for d, ids in probe_parts.items() for _ in ids])
    return tokenizer, train, probe


def probe_tags(probe: ProbeSet, tokenizer, result) -> list[str]:
    """The pattern label of every probe token, in the result's token order."""
    ids = probe.input_ids.numpy()
    texts = [[tokenizer.decode([t]) for t in row] for row in ids.tolist()]
    return tag_tokens(result.token_sequence, result.token_position, ids, texts).tolist()


def summarize(results, head_history: dict, tags: list[str]) -> dict:
    final_scores = head_history[max(head_history)]
    names = results[-1].component_names
    prefix = final_scores["prefix_matching"].reshape(-1)
    previous = final_scores["previous_token"].reshape(-1)
    induction = {n for n, v in zip(names, prefix) if v >= THRESHOLD and n.startswith("l1")}
    previous_token = {n for n, v in zip(names, previous) if v >= THRESHOLD and n.startswith("l0")}
    circuit = induction | previous_token
    timeline = []
    for result in results:
        scores = head_history.get(result.step)
        entry = {"step": result.step,
                 "second_copy_loss": float(scores["second_copy_loss"]) if scores else None,
                 "whole_model": pc_separation(result, circuit),
                 "layer0": pc_separation(result, previous_token, layer=0),
                 "layer1": pc_separation(result, induction, layer=1),
                 "layer0_spectroscopy": pc_separation(result, previous_token, layer=0,
                                                      standardization="spectroscopy"),
                 "layer1_spectroscopy": pc_separation(result, induction, layer=1,
                                                      standardization="spectroscopy")}
        timeline.append(entry)
    first = {scope: next((e["step"] for e in timeline
                          if any(pc["margin"] > 0 for pc in e[scope])), None)
             for scope in SCOPES}
    return {"threshold": THRESHOLD,
            "prefix_matching": dict(zip(names, np.round(prefix, 3).tolist())),
            "previous_token": dict(zip(names, np.round(previous, 3).tolist())),
            "induction_heads": sorted(induction), "previous_token_heads": sorted(previous_token),
            "first_step_a_top_pc_separates_the_group": first,
            "tag_scores_final": tag_scores(results[-1], tags), "timeline": timeline}


def print_summary(summary: dict) -> None:
    print(f"\ninduction heads (prefix matching >= {THRESHOLD}): {summary['induction_heads']}")
    print(f"previous-token heads (>= {THRESHOLD}):          {summary['previous_token_heads']}")
    print("per snapshot: second-copy loss; for each scope (whole model, group: both kinds; "
          "layer 0: previous-token heads; layer 1: induction heads), the top PCs' explained "
          "variance and the best separation margin (> 0: the PC alone separates the group)")
    for entry in summary["timeline"]:
        loss = entry["second_copy_loss"]
        parts = [f"step {entry['step']:5d}  loss {'n/a' if loss is None else f'{loss:.2f}'}"]
        for scope in SCOPES:
            pcs = entry[scope]
            best = max(pcs, key=lambda pc: np.nan_to_num(pc["margin"], nan=-9))
            variance = "/".join(f"{100 * pc['explained_variance']:.1f}" for pc in pcs)
            margin = "margin n/a (no such heads yet)" if np.isnan(best["margin"]) else \
                f"PC{best['pc']} {best['margin']:+.3f}"
            parts.append(f"{scope} {variance}% {margin}")
        print("  ".join(parts))
    print(f"first step a top PC separates the group: "
          f"{summary['first_step_a_top_pc_separates_the_group']}")
    clusters = summary["clusters"]
    held = clusters["induction_cluster"]
    print(f"token clusters at step {clusters['step']}: {clusters['count']}, "
          f"{clusters['stability']['stable_clusters']} stable (best Jaccard >= 0.5 with "
          f"another seed's; ARI {clusters['stability']['ari']}); induction tokens: "
          f"{held['share_of_induction_tokens']:.0%} in cluster {held['cluster']} (purity "
          f"{held['purity']:.0%}), formed at step {held['first_formed_at_step']}")


def main() -> None:
    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="about 2 minutes on an idle 2-core CPU")
    group.add_argument("--full", action="store_true", help="the long run, for a GPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path("outputs/cache"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name = "quick" if args.quick else "full" if args.full else "default"
    mode = MODES[name]
    out = args.out or Path("outputs") / f"induction_demo_{name}"

    tokenizer, train, probe = build_data(mode, args.seed, args.cache)
    log_dir = out / "runs" / "demo"
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)  # the Trainer's loss goes here too
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_head=8, n_embd=128, n_positions=CONTEXT, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    schedule = Schedule(log_spaced=mode.snapshots, every=mode.every, at_start=True,
                        at_end=True)
    susceptibility = SusceptibilityCallback(
        probe, components="heads", schedule=schedule, log_dir=log_dir,
        config=SGLDConfig(num_chains=mode.chains, num_draws=mode.draws, batch_size=16,
                          observable_sequences=16, seed=args.seed))
    heads = HeadScoresCallback(schedule, len(tokenizer), log_dir)
    training = TrainingArguments(
        output_dir=str(out), max_steps=mode.steps, per_device_train_batch_size=32,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=10,
        save_strategy="steps", save_steps=max(1, mode.steps // 2), report_to="tensorboard",
        use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=LanguageModelingData(train),
                      data_collator=default_data_collator, processing_class=tokenizer,
                      callbacks=[susceptibility, heads])
    susceptibility.bind(trainer)  # writes beside the Trainer's loss, reports to its loggers
    trainer.train()

    results = load_results(out)
    summary = summarize(results, heads.history, probe_tags(probe, tokenizer, results[-1]))
    print("clusters: a second estimate of the last checkpoint (seed + 1) for their "
          "stability ...", flush=True)
    second = estimate_susceptibilities(
        trainer.model, "heads", train, probe, susceptibility.config.replace(
            seed=args.seed + 1, progress=False), step=results[-1].step)
    second.extra["probe_tokens"] = results[-1].extra.get("probe_tokens")
    summary["clusters"] = cluster_findings(results, second)
    (out / "findings.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    report = write_report(results, out / "report", title="Induction demo",
                          training_loss=training_losses(out))
    print(f"\nTensorBoard: tensorboard --logdir {log_dir.parent}")
    print(f"report:      {report}")
    print(f"findings:    {out / 'findings.json'}")


if __name__ == "__main__":
    main()
