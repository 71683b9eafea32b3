"""The tools timed side by side: the engine, and a plain sequential loop (the tests'
reference chain, ``tests/reference.py``) streaming the same estimator's sums."""

from __future__ import annotations

import numpy as np
from reference import mean_valid_loss, probe_token_losses, reference_chain

from bench.workloads import (
    GAMMA,
    N_BETA,
    NUM_BURNIN,
    SEED,
    STEP_SIZE,
    STEPS_BETWEEN_DRAWS,
    Workload,
    engine_sampling_order,
    mean_loss_no_grad,
    observable_sequences,
)


def run_engine(model, w: Workload, sampling, probe, labels, *, anchor="exact"):
    from susc_callback import ProbeSet, SGLDConfig, estimate_susceptibilities

    m = observable_sequences(w)
    data, _ = engine_sampling_order(sampling, m)
    config = SGLDConfig(step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA,
                        num_chains=w.num_chains, num_draws=w.num_draws, num_burnin=NUM_BURNIN,
                        steps_between_draws=STEPS_BETWEEN_DRAWS, batch_size=w.batch_size,
                        observable="fixed", observable_sequences=m, anchor=anchor,
                        seed=SEED, progress=False)
    probe_set = ProbeSet.from_tensors(probe, datasets=labels)
    return estimate_susceptibilities(model, None, data, probe_set, config)


def run_plain_loop(model, w: Workload, sampling, probe, *, eval_batch: int = 32):
    """One chain at a time, per component (:func:`reference.reference_chain`): a float32
    copy of the model, full forward and full backward, the SGLD update
    ``u <- u - eps/2 (n_beta grad + gamma (u - u*)) + sqrt(eps) N(0, I)`` on the
    component's entries, and at every draw (before the step, as the engine) the loss on
    the fixed observable set and the per-token probe losses (no grad, full forward). Its
    own seeds, so an independent estimate. Streams the same sums as the engine's
    estimator. Returns (component names, chi (C, P), E_C[phi] (C,))."""
    import torch

    from susc_callback import head_components
    from susc_callback.data.sampling import EpochSampler

    device = next(model.parameters()).device
    m = observable_sequences(w)
    _, obs_rows = engine_sampling_order(sampling, m)
    sampling = sampling.to(device)
    observable = {"input_ids": sampling[torch.tensor(obs_rows, device=device)]}
    probe = {"input_ids": probe.to(device)}
    anchor = mean_loss_no_grad(model, observable["input_ids"], eval_batch)  # exact
    components = [(c.name, {n: mask.to(device) for n, mask in c.masks.items()})
                  for c in head_components(model)]
    components.append(("full", {name: None for name, _ in model.named_parameters()}))
    num_tokens = probe["input_ids"].shape[0] * (probe["input_ids"].shape[1] - 1)
    sums = {}
    for index, (name, masks) in enumerate(components):
        s = {"n": 0, "phi": 0.0, "loss": 0.0, "phi_loss": 0.0,
             "token": torch.zeros(num_tokens, dtype=torch.float64, device=device),
             "phi_token": torch.zeros(num_tokens, dtype=torch.float64, device=device)}

        def add_draw(chain_model, s=s):
            obs_loss = float(mean_valid_loss(chain_model, observable, eval_batch))
            token = probe_token_losses(chain_model, probe, eval_batch)
            phi = obs_loss - anchor
            s["n"] += 1
            s["phi"] += phi
            s["loss"] += obs_loss
            s["phi_loss"] += phi * obs_loss
            s["token"] += token
            s["phi_token"] += phi * token

        for chain in range(w.num_chains):
            batches = EpochSampler(len(sampling), w.batch_size,
                                   torch.Generator().manual_seed(SEED * 7919 + chain))
            reference_chain(
                model, masks, lambda order=batches: {"input_ids": sampling[order.next()]},
                num_steps=NUM_BURNIN + w.num_draws * STEPS_BETWEEN_DRAWS,
                step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA,
                noise=torch.Generator(device=device).manual_seed(1000 * index + chain),
                draw_at=lambda step: step >= NUM_BURNIN
                and (step - NUM_BURNIN) % STEPS_BETWEEN_DRAWS == 0,
                on_draw=add_draw)
        sums[name] = s
    full = sums.pop("full")
    names = [n for n, _ in components if n != "full"]
    full_delta = (full["token"] - full["loss"]) / full["n"]
    chi = []
    for n in names:
        s = sums[n]
        cov = (s["phi_token"] - s["phi_loss"]) / s["n"]
        chi.append((-(cov - (s["phi"] / s["n"]) * full_delta)).cpu().numpy())
    mean_phi = np.array([sums[n]["phi"] / sums[n]["n"] for n in names])
    return names, np.stack(chi), mean_phi
