"""The token view's default quantity tells an induction head from a non-induction head on
the demo's model (tests/data/induction_gpt2): on repeated random sequences, the induction
head expresses the repeats (relative to the first period) and the other head does not.

Which head is which comes from the model's attention alone (prefix matching: how much a
token attends to the token after its previous occurrence), not from the estimator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from susc_callback import ProbeSet, SGLDConfig, estimate_susceptibilities, head_components
from susc_callback.analysis.token_views import token_quantity

FIXTURE = Path(__file__).parent / "data" / "induction_gpt2"
HEADS = [f"l1h{i}" for i in range(8)]


@pytest.fixture(scope="module")
def model():
    return GPT2LMHeadModel.from_pretrained(FIXTURE).float().eval()


@pytest.fixture(scope="module")
def repeated():
    """Random tokens repeating with a period of 8-40; (ids, periods)."""
    generator = torch.Generator().manual_seed(123)
    rows, periods = [], []
    for _ in range(8):
        period = int(torch.randint(8, 41, (1,), generator=generator))
        unit = torch.randint(0, 512, (period,), generator=generator)
        rows.append(unit.repeat(64 // period + 1)[:64])
        periods.append(period)
    return torch.stack(rows), periods


def prefix_matching(ids, periods) -> np.ndarray:
    """(heads of layer 1,) mean attention from each repeated token to the token after its
    previous occurrence (``t - period + 1``)."""
    eager = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager").float().eval()
    with torch.no_grad():
        attention = eager(input_ids=ids, output_attentions=True).attentions[1]  # (B, H, T, T)
    scores = []
    for row, period in enumerate(periods):
        t = torch.arange(period, ids.shape[1])
        scores.append(attention[row][:, t, t - period + 1].mean(-1))
    return torch.stack(scores).mean(0).numpy()


def test_the_default_view_separates_induction_from_non_induction_heads(model, repeated):
    """Criterion: on repeated sequences, (mean over repeated tokens - mean over the first
    period) of the default quantity is negative (expressed) on average over the induction
    heads and positive for the non-induction head; with chi itself every head of the layer
    has the same sign. One seed's heads are noisy one by one (the rank correlation with
    prefix matching was 0.4-0.8 over seeds), the average over 7 heads is not."""
    ids, periods = repeated
    scores = prefix_matching(ids, periods)
    induction = [h for h, score in zip(HEADS, scores) if score > 0.3]
    others = [h for h, score in zip(HEADS, scores) if score < 0.1]
    assert len(induction) == 7 and others == ["l1h7"]  # the fixture is what it claims

    sampling = load_file(str(FIXTURE / "sampling.safetensors"))["input_ids"].long()
    config = SGLDConfig(num_chains=1, num_draws=30, batch_size=16, observable_sequences=16,
                        seed=0, progress=False)
    heads = [c for c in head_components(model) if c.name in HEADS]
    result = estimate_susceptibilities(model, heads, sampling,
                                       ProbeSet.from_tensors(ids, datasets="induction"),
                                       config)
    repeats = result.token_position + 1 >= np.array(periods)[result.token_sequence]

    def repeat_minus_first(quantity: str) -> dict[str, float]:
        values = token_quantity(result, quantity)
        return {name: float(row[repeats].mean() - row[~repeats].mean())
                for name, row in zip(result.component_names, values)}

    chi = repeat_minus_first("chi")
    assert len({np.sign(chi[h]) for h in HEADS}) == 1  # one shared profile
    relative = repeat_minus_first("relative-to-layer")
    assert np.mean([relative[h] for h in induction]) < 0 < relative["l1h7"]
