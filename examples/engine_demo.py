"""Train a tiny GPT-2 on sequences with repeated spans, then estimate per-head susceptibilities.

Runs on a CPU in about a minute:

    python examples/engine_demo.py --out outputs/engine_demo

Prints the heads x probe-datasets susceptibility matrix, the refined LLC of every head, the
explained variance of the top principal components, and saves the result next to a
checkpoint of the model (``outputs/engine_demo/susceptibility``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from toy_data import CONTEXT, VOCAB, random_tokens, repeated_spans
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from susc_callback import ProbeSet, SGLDConfig, SusceptibilityPCA, estimate_susceptibilities


def train(model: GPT2LMHeadModel, data: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step:4d}  loss {loss.item():.3f}")
    model.eval()


def trained_toy_model(steps: int) -> tuple[GPT2LMHeadModel, torch.Tensor, torch.Generator]:
    """A 2-layer, 4-head GPT-2 trained on 512 repeated spans then 512 random sequences
    (the data, in that order), and the generator to draw further data from."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB,
                                       n_positions=CONTEXT, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    data = torch.cat([repeated_spans(512, generator), random_tokens(512, generator)])
    train(model, data, steps)
    return model, data, generator


def main() -> None:
    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/engine_demo"))
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--draws", type=int, default=40)
    args = parser.parse_args()

    model, data, generator = trained_toy_model(args.train_steps)

    probe = ProbeSet.from_tensors(
        torch.cat([repeated_spans(8, generator), random_tokens(8, generator)]),
        datasets=["repeated"] * 8 + ["random"] * 8)
    config = SGLDConfig(num_chains=2, num_draws=args.draws, batch_size=16,
                        observable_sequences=32, seed=0)
    result = estimate_susceptibilities(model, None, data, probe, config, step=args.train_steps)

    print("\nsusceptibility per head and probe dataset (negative = expresses):")
    print("head    " + "".join(f"{name:>12}" for name in result.dataset_names) + "        rLLC")
    for i, name in enumerate(result.component_names):
        row = "".join(f"{v:12.4f}" for v in result.dataset_chi[i])
        print(f"{name:8}{row}{result.rllc[i]:12.2f}")
    print(f"full-model LLC: {result.llc_full:.2f}")
    pca = SusceptibilityPCA(n_components=3).fit(result)
    ratios = ", ".join(f"{100 * r:.1f}%" for r in pca.explained_variance_ratio_)
    print(f"explained variance of PC1-3 (structural-inference standardization): {ratios}")
    for k in range(2):
        loadings = " ".join(f"{n}:{v:+.2f}" for n, v in zip(pca.component_names_,
                                                            pca.loadings_[k]))
        print(f"PC{k + 1} loadings: {loadings}")
    scores = dict(zip(pca.dataset_names_, np.round(pca.dataset_scores_[:, 0], 4).tolist()))
    print(f"PC1 mean token score by dataset: {scores}")

    model.save_pretrained(args.out / "checkpoint")
    saved = result.save(args.out / "susceptibility")
    print(f"\nsaved the model to {args.out / 'checkpoint'} and the result to {saved}")


if __name__ == "__main__":
    main()
