"""Shared tiny models and data: everything is built from configs, nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import (
    causal_lm_loss,
    causal_token_losses,
    probe_token_losses,
    reference_chain,
)
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from susc_callback import ProbeSet, SGLDConfig, estimate_susceptibilities
from susc_callback.data.sampling import EpochSampler
from susc_callback.sampler.sgld import chain_seed, make_generator

__all__ = ["NEW_PRECISION_API", "causal_lm_loss", "causal_token_losses", "estimate",
           "reference_draws", "tiny_causal_lm", "tiny_gpt2"]

hf_logging.set_verbosity_error()


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """The test models are tiny: intra-op threads only add synchronisation, which costs
    several times the work on a busy 2-core machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

VOCAB, CONTEXT = 64, 16

# Tests parametrized over DEVICES also run on a CUDA device when there is one.
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=CONTEXT,
                        bos_token_id=0, eos_token_id=0, **overrides)
    return GPT2LMHeadModel(config)


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2().eval()


@pytest.fixture
def sampling_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (24, CONTEXT), generator=generator)


@pytest.fixture
def probe() -> ProbeSet:
    return probe_set()


def probe_set() -> ProbeSet:
    """Four sequences from two datasets, one of them right-padded."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, CONTEXT), generator=generator)
    mask = torch.ones_like(ids)
    mask[3, 10:] = 0  # one right-padded sequence
    return ProbeSet.from_tensors(ids, mask, datasets=["a", "a", "b", "b"])


@pytest.fixture
def config() -> SGLDConfig:
    return SGLDConfig(num_chains=2, num_draws=4, batch_size=4, observable_sequences=4,
                      eval_batch_size=3, step_size=1e-3, n_beta=10.0, gamma=100.0,
                      progress=False)


def tiny_causal_lm(model_type: str):
    """A 2-layer, 4-head causal LM of another architecture, built from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=32)
    extra = {"llama": dict(num_key_value_heads=2, head_dim=8),
             "mistral": dict(num_key_value_heads=2), "qwen2": dict(num_key_value_heads=4),
             "gpt_neox": dict(rotary_pct=0.5)}[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **common, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def estimate(model, probe, sampling_ids, config, components=None, **kwargs):
    return estimate_susceptibilities(model, components, sampling_ids, probe, config, **kwargs)


def sequence_losses(model, batch):
    """Each sequence's mean valid-token loss and its share of the valid tokens (float64)."""
    losses, valid = causal_token_losses(model, batch["input_ids"])
    totals = torch.where(valid, losses, 0.0).double().sum(1)
    counts = valid.double().sum(1)
    return (totals / counts).cpu(), (counts / counts.sum()).cpu()


def reference_draws(model, masks, data, probe, cfg, name, device="cpu"):
    """(phi, L, l_x, diagonal) at every draw of every chain of component ``name``,
    computed the plain way (:func:`reference.reference_chain`) with the engine's seeds, on
    ``device``. ``L`` is measured on the fixed observable set, or with
    ``observable="per-block"`` on the set of the draw's block of its chain; ``phi = L -
    L(w*)`` on the same set; ``diagonal = sum_s w_s (l_s - l_s(w*)) l_s`` over its
    sequences ``s`` (``w_s``: a sequence's share of the set's valid tokens)."""
    device = torch.device(device)
    start = copy.deepcopy(model).to(device)

    def observable_set(*labels):
        order = torch.randperm(len(data), generator=make_generator(
            torch.device("cpu"), chain_seed(cfg.seed, "observable", *labels)))
        return {"input_ids": data[order[:cfg.observable_sequences]].to(device)}

    fixed = observable_set()
    blocks = min(4, cfg.num_draws)
    probe_batch = {"input_ids": probe.input_ids.to(device),
                   "attention_mask": probe.attention_mask.to(device)}
    draws = []

    def on_draw(work, chain):
        observable = fixed
        if cfg.observable == "per-block":
            block = len(draws) % cfg.num_draws * blocks // cfg.num_draws
            observable = observable_set(chain, block)
        with torch.no_grad():
            anchors, weights = sequence_losses(start.float(), observable)
        losses, _ = sequence_losses(work, observable)
        anchor, loss = (weights * anchors).sum(), (weights * losses).sum()
        diagonal = (weights * (losses - anchors) * losses).sum()
        draws.append((loss - anchor, loss, probe_token_losses(work, probe_batch).cpu(),
                      diagonal))

    for chain in range(cfg.num_chains):
        batches = EpochSampler(len(data), cfg.batch_size, make_generator(
            torch.device("cpu"), chain_seed(cfg.seed, "batches", chain)))
        reference_chain(
            start, masks, lambda order=batches: {"input_ids": data[order.next()].to(device)},
            num_steps=cfg.num_steps, step_size=cfg.step_size, n_beta=cfg.n_beta,
            gamma=cfg.gamma, noise=make_generator(device, chain_seed(cfg.seed, "noise", name,
                                                                     chain)),
            draw_at=lambda step: cfg.draw_at(step) is not None,
            on_draw=lambda work, chain=chain: on_draw(work, chain))
    return draws
