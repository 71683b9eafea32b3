"""Train a small GPT-2 with the Hugging Face Trainer and watch its heads' susceptibilities.

Runs on 2 CPU cores in about a minute and a half:

    python examples/train_with_callback.py --out outputs/callback_demo
    tensorboard --logdir outputs/callback_demo/runs

Half of the training sequences are random spans repeated once (learnable only by induction),
half are random tokens. ``SusceptibilityCallback`` snapshots the model on a log-spaced
schedule; TensorBoard shows ``train/loss`` and, in the same run, the heads' susceptibilities
per probe dataset, their refined LLCs, the principal components with aligned loadings, the
heatmap, loadings and trajectory figures, the token table and the projector.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from toy_data import CONTEXT, VOCAB, LanguageModelingData, random_tokens, repeated_spans
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from susc_callback import ProbeSet, Schedule, SGLDConfig, SusceptibilityCallback


def main() -> None:
    hf_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/callback_demo"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--snapshots", type=int, default=8, help="log-spaced snapshots")
    parser.add_argument("--draws", type=int, default=30)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    train_ids = torch.cat([repeated_spans(1024, generator), random_tokens(1024, generator)])
    probe = ProbeSet.from_tensors(
        torch.cat([repeated_spans(8, generator), random_tokens(8, generator)]),
        datasets=["repeated"] * 8 + ["random"] * 8)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB,
                                       n_positions=CONTEXT, bos_token_id=0, eos_token_id=0))
    callback = SusceptibilityCallback(
        probe,
        components="heads",
        config=SGLDConfig(num_chains=2, num_draws=args.draws, batch_size=16,
                          observable_sequences=32),
        schedule=Schedule(log_spaced=args.snapshots, at_start=True, at_end=True),
        n_pcs=3,
    )
    training = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=32,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=20,
        save_strategy="steps", save_steps=args.steps // 2, report_to="tensorboard",
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=LanguageModelingData(train_ids))
    callback.bind(trainer)  # adds it, and writes into the TensorBoard run of the loss
    output = trainer.train()

    history = trainer.state.log_history
    snapshots = [e for e in history if "snapshot/seconds" in e]
    losses = [e for e in history if "loss" in e]
    for entry in losses[::5] + losses[-1:]:
        print(f"step {entry['step']:4d}  loss {entry['loss']:.3f}")
    snapshot_seconds = sum(e["snapshot/seconds"] for e in snapshots)
    step_seconds = (output.metrics["train_runtime"] - snapshot_seconds) / args.steps
    print(f"\n{len(snapshots)} snapshots at steps {[e['step'] for e in snapshots]}")
    print(f"one snapshot: {snapshot_seconds / len(snapshots):.2f} s = "
          f"{snapshot_seconds / len(snapshots) / step_seconds:.0f} training steps "
          f"({step_seconds * 1000:.0f} ms each); snapshots took "
          f"{100 * snapshots[-1]['snapshot/time_share']:.0f}% of the run")
    last = snapshots[-1]
    print("final PC1 loadings: " + " ".join(
        f"{key.split('/')[-1]}:{value:+.2f}" for key, value in last.items()
        if key.startswith("aligned_pc1_loading/")))
    print(f"\nresults:     {callback.results_dir}")
    print(f"TensorBoard: tensorboard --logdir {callback.tensorboard_dir.parent}")


if __name__ == "__main__":
    main()
