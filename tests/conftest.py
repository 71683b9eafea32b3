"""Shared tiny models and data: everything is built from configs, nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from susc_callback import ProbeSet, SGLDConfig

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
