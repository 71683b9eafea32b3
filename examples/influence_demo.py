"""Which training sequences shape which predictions: the influence matrix of a tiny GPT-2.

    python examples/influence_demo.py --out outputs/influence_demo     # about a minute

The model (2 layers x 4 heads) is trained on a mix of repeated spans (the second half
copies the first: predictable only by induction) and uniformly random sequences. Then
``estimate_influence`` measures the influence of 64 of its training sequences (half of
each kind) on 8 held-out queries (half of each kind) under the localized posterior and
under the restricted posterior of every head, from one set of SGLD chains per posterior.

It prints, for each query, the training sequences that most lower and most raise its loss
and what kind they are; the share of repeated-span sequences among those that most lower
a repeated-span query's loss (chance: one half); and the training sequences with the
largest self-influence. It writes ``report.html`` (``write_influence_report``) and saves
the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from engine_demo import trained_toy_model
from toy_data import random_tokens, repeated_spans
from transformers.utils import logging as hf_logging

from susc_callback import ProbeSet, SGLDConfig
from susc_callback.influence import estimate_influence
from susc_callback.influence.views import influential_sequences
from susc_callback.logging.influence_report import write_influence_report


def main() -> None:
    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/influence_demo"))
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()

    model, data, generator = trained_toy_model(args.train_steps)
    kinds = ["repeated"] * 512 + ["random"] * 512

    index = np.concatenate([np.arange(32), 512 + np.arange(32)])  # 32 of each kind
    train_set = ProbeSet.from_tensors(data[index], datasets=[kinds[i] for i in index])
    queries = ProbeSet.from_tensors(
        torch.cat([repeated_spans(4, generator), random_tokens(4, generator)]),
        datasets=["repeated"] * 4 + ["random"] * 4)
    config = SGLDConfig(num_chains=2, num_draws=args.draws, batch_size=16,
                        observable_sequences=32, seed=0)
    result = estimate_influence(model, train_set, queries, config, components="heads",
                                sampling_data=data, train_index=index,
                                step=args.train_steps)

    print(f"\ninfluence of {len(index)} training sequences on {len(queries)} queries, "
          f"posteriors {result.posterior_names}")
    same_kind = []
    for query in range(len(queries)):
        found = influential_sequences(result, query, args.top)
        kind = queries.datasets[query]
        lowering = [train_set.datasets[i] for i, _ in found.lowering]
        raising = [train_set.datasets[i] for i, _ in found.raising]
        print(f"query {query} ({kind:8}): lower its loss: {lowering}\n"
              f"{'':20}raise its loss: {raising}")
        if kind == "repeated":
            same_kind += [k == "repeated" for k in lowering]
    print(f"repeated-span training sequences among the {args.top} that most lower a "
          f"repeated-span query's loss: {np.mean(same_kind):.0%} (chance: 50%)")
    self_influence = result.self_influence[0]
    strongest = np.argsort(self_influence)[:5]  # most negative: the loss varies most
    print("largest self-influence (|-Var l_i|): "
          + ", ".join(f"#{index[i]} {train_set.datasets[i]} {self_influence[i]:.2g}"
                      for i in strongest))
    for head in ("l1h0", "l1h1"):
        column = result.sequence_matrix(head)[:, 0]
        print(f"query 0 seen through {head}: mean influence of repeated / random training "
              f"sequences {column[:32].mean():+.2g} / {column[32:].mean():+.2g}")
    saved = result.save(args.out / "influence")
    page = write_influence_report([result], args.out, count=args.top,
                                  title="Influence demo")
    print(f"\nsaved {saved}; report {page}")


if __name__ == "__main__":
    main()
