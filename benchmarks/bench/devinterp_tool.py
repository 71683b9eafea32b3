"""devinterp 2.0.1's ``susceptibilities()`` with the engine's settings, and its results in
the engine's layout (the ``bench`` extra installs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.workloads import (
    DEVINTERP_BATCHES_PER_DRAW,
    DEVINTERP_INIT_LOSS_BATCHES,
    DEVINTERP_INIT_SEED,
    DEVINTERP_OBS_SEED,
    GAMMA,
    N_BETA,
    NUM_BURNIN,
    STEP_SIZE,
    STEPS_BETWEEN_DRAWS,
    Workload,
    devinterp_observable_indices,
)


def run_devinterp(model, w: Workload, sampling, probe, out_dir: Path, device: str):
    """devinterp's ``susceptibilities()`` with the same settings.

    What is the same: SGLD hyperparameters (lr, n_beta, localization = gamma, no burn-in, one
    step between draws, no weight decay, noise 1), num_chains, num_draws, batch_size, the
    sampling data (as an HF Dataset), the probe sequences, the head weight restrictions
    (built from ``susc_callback.head_components`` masks), and the observable set: devinterp
    measures L on ``batches_per_draw * batch_size`` = 3 * batch_size fixed sampling
    sequences (random.Random(1337)); the engine and the plain loop use those very sequences.

    What differs: (1) devinterp anchors phi at ``init_loss``, the mean loss at w* of
    ``num_init_loss_batches`` (32) shuffled minibatches of the sampling data (here that is
    the whole sampling set), *not* of the observable set, so phi(w*) != 0; the engine's
    ``anchor="separate-batches"`` mimics this, but with ``observable_sequences`` (3 *
    batch_size) other sequences, so its offset is not the same number. (2) devinterp takes
    a draw *after* the SGLD step, the engine *before* it (a one-step shift of each chain).
    (3) Different RNG streams (noise and minibatch order), so agreement is statistical.
    (4) devinterp samples in train mode (dropout is 0 here, so no effect) and stores every
    draw's losses in zarr. ``devinterp_recompute`` re-derives devinterp's estimate from those
    stored draws with the exact anchor, which removes difference (1).
    """
    from datasets import Dataset
    from devinterp.slt.susceptibilities import susceptibilities

    from susc_callback import head_components

    sampling_ds = Dataset.from_dict({"input_ids": sampling.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe.tolist()}).with_format("torch")
    restrictions = {c.name: {n: m.to(device) for n, m in c.masks.items()}
                    for c in head_components(model)}
    restrictions["full"] = None
    tree = susceptibilities(
        model, sampling_ds,
        observables={"train": (sampling_ds, DEVINTERP_BATCHES_PER_DRAW),
                     "probe": (probe_ds, len(probe) // w.batch_size)},
        weight_restrictions=restrictions, sampling_task="train",
        lr=STEP_SIZE, n_beta=N_BETA, localization=GAMMA, num_chains=w.num_chains,
        num_draws=w.num_draws, batch_size=w.batch_size, num_burnin_steps=NUM_BURNIN,
        num_steps_bw_draws=STEPS_BETWEEN_DRAWS, num_init_loss_batches=DEVINTERP_INIT_LOSS_BATCHES,
        init_seed=DEVINTERP_INIT_SEED, obs_seed=DEVINTERP_OBS_SEED, device=device,
        output_path=out_dir / "devinterp_samples.zarr")
    return tree


def devinterp_chi(tree, probe, names: list[str]) -> np.ndarray:
    """devinterp's (flat token, wr) matrix as (components, probe tokens) in the engine's
    token order (sequence-major; token (s, t) predicts ``probe[s, t + 1]``)."""
    sus = tree["susceptibilities"].dataset
    wr = [str(x) for x in sus["wr"].values]
    batch = np.asarray(sus["batch"].values)
    target = np.asarray(sus["target_position"].values)
    n_seq, length = probe.shape
    order = devinterp_observable_indices(n_seq, n_seq)  # devinterp's probe row -> our row
    context = tree["context"].dataset["input_ids"].values.reshape(n_seq, length)
    if not np.array_equal(context, probe.numpy()[order]):
        raise RuntimeError("devinterp probe order is not the expected one")
    columns = np.asarray(order)[batch] * (length - 1) + (target - 1)
    values = np.asarray(sus["sus"].values)
    chi = np.full((len(names), n_seq * (length - 1)), np.nan)
    for row, name in enumerate(names):
        chi[row, columns] = values[:, wr.index(name)]
    return chi


def devinterp_recompute(work: Path, names: list[str], probe, anchors: dict[str, float]
                        ) -> tuple[dict[str, np.ndarray], float]:
    """devinterp's estimator recomputed from the per-draw losses its ``sample()`` stored
    (one zarr per weight restriction), with phi anchored at each of ``anchors`` (name ->
    L(w*)); "init_loss" is added (devinterp's own anchor, which must reproduce its output).
    Returns (name -> chi (components, probe tokens) in the engine's token order, init_loss)."""
    import xarray as xr

    def load(wr):
        path = work / f"devinterp_samples_{wr}.zarr"
        return xr.open_datatree(str(path), engine="zarr", consolidated=False).dataset

    full = load("full")
    full_mean = float(full["loss_train"].values.astype(np.float64).mean())
    full_delta = full_mean - full["loss_probe"].values.astype(np.float64).mean(axis=(0, 1))
    anchors = {"init_loss": float(full["init_loss"].values.astype(np.float64).mean()),
               **anchors}
    n_seq, length = probe.shape
    order = np.asarray(devinterp_observable_indices(n_seq, n_seq))
    out = {key: np.full((len(names), n_seq * (length - 1)), np.nan) for key in anchors}
    for row, name in enumerate(names):
        ds = load(name)
        observable = ds["loss_train"].values.astype(np.float64).mean(axis=(-2, -1))
        tokens = ds["loss_probe"].values.astype(np.float64)  # (chain, draw, batch, position)
        for key, anchor in anchors.items():
            phi = observable - anchor
            sus = ((phi * observable).mean() - (phi[:, :, None, None] * tokens).mean(axis=(0, 1))
                   - phi.mean() * full_delta)  # devinterp's compute_susceptibilities
            chi = np.empty((n_seq, length - 1))
            chi[order] = sus
            out[key][row] = chi.ravel()
    return out, anchors["init_loss"]
