"""Fixed estimates whose arrays were saved by the engine (``tests/golden/``, written by
``python tests/golden_cases.py``; first before the issue-14 restructuring at commit
05833c6, again at issue 21, when SGLD noise came to be drawn in blocks of steps, a new
random stream, and a full batch came to be the data in its order): the same seed and
settings must give the same numbers, bitwise, on the machine type they were written on.
Each case exercises another path of the engine (stacked and one-at-a-time
chains, prefix replay, chunked passes, minibatch observable, burn-in and thinning, the
separate anchor, a generic module with its own loss, forked workers)."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from susc_callback import Component, ProbeSet, SGLDConfig, estimate_susceptibilities

GOLDEN_DIR = Path(__file__).parent / "golden"
ARRAYS = ("chi", "dataset_chi", "rllc", "mean_phi", "anchor_loss", "loss_traces",
          "full_loss_trace", "token_sequence", "token_position")


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64,
                                      n_positions=16, bos_token_id=0, eos_token_id=0)).eval()


def _gpt2_data() -> tuple[torch.Tensor, ProbeSet]:
    generator = torch.Generator().manual_seed(1)
    sampling = torch.randint(0, 64, (24, 16), generator=generator)
    ids = torch.randint(0, 64, (4, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[3, 10:] = 0
    return sampling, ProbeSet.from_tensors(ids, mask, datasets=["a", "a", "b", "b"])


class _TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _squared_error(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return 0.5 * (model(batch["x"]) - batch["y"]) ** 2  # (B, 2) per-sample losses


BASE = dict(num_chains=2, num_draws=6, batch_size=4, observable_sequences=4,
            eval_batch_size=32, step_size=1e-3, n_beta=10.0, gamma=100.0, seed=3,
            progress=False, workers=1, observable="fixed",  # the defaults when saved
            unbiased_observable=False)

CASES = {
    "gpt2_stacked": dict(components="heads,mlp", config=dict(batch_chains="on")),
    "gpt2_sequential_minibatch": dict(components=None, config=dict(
        batch_chains="off", observable="minibatch", num_burnin=2, steps_between_draws=2,
        eval_batch_size=3)),
    "gpt2_separate_anchor": dict(components="layers", config=dict(
        anchor="separate-batches", observable_sequences=3)),
    "gpt2_workers": dict(components="heads", config=dict(workers=2, batch_chains="off")),
    "regression": dict(components=None, config=dict(batch_chains="auto", num_draws=10)),
}


def run_case(name: str):
    """The estimate of case ``name`` with the code as it is now."""
    case = CASES[name]
    config = SGLDConfig(**{**BASE, **case["config"]})
    if name == "regression":
        generator = torch.Generator().manual_seed(5)
        x, y = torch.randn(30, 4, generator=generator), torch.randn(30, 2, generator=generator)
        probe = ProbeSet.from_batch({"x": x[:5], "y": y[:5]}, datasets=["p"] * 5)
        components = [Component("a", {"a.weight": None, "a.bias": None}),
                      Component("b_row0", {"b.weight": torch.tensor([[True] * 6, [False] * 6])})]
        return estimate_susceptibilities(_TwoLayer(), components, {"x": x, "y": y}, probe,
                                         config, loss_fn=_squared_error)
    sampling, probe = _gpt2_data()
    return estimate_susceptibilities(_gpt2(), case["components"], sampling, probe, config)


def machine() -> dict:
    """What bitwise equality depends on besides the code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu": _cpu_model(), "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    """The CPU's model name and matrix-unit flags (oneDNN picks other kernels on AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    return " ".join([model, *sorted(f for f in flags if f.startswith("amx"))])


def write_all() -> None:
    from safetensors.numpy import save_file

    torch.set_num_threads(1)
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name in CASES:
        result = run_case(name)
        save_file({key: np.ascontiguousarray(getattr(result, key)) for key in ARRAYS},
                  str(GOLDEN_DIR / f"{name}.safetensors"))
        meta = {"component_names": result.component_names, "llc_full": result.llc_full,
                "failed": result.failed}
        (GOLDEN_DIR / f"{name}.json").write_text(json.dumps(meta, indent=1))
    (GOLDEN_DIR / "machine.json").write_text(json.dumps(machine(), indent=1))


if __name__ == "__main__":
    sys.exit(write_all())
