"""Global state an estimate must leave exactly as it found it: RNG streams and float32
matmul precision."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng_state(device: torch.device) -> Iterator[None]:
    """Restore the torch (CPU and CUDA), numpy and python RNG states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def ieee_float32() -> Iterator[None]:
    """True float32 matmuls and convolutions inside the block (no TF32 or bfloat16 matmuls),
    restored on exit.

    Sampling is defined in float32, and stacked chains are checked against one-at-a-time
    evaluation at float32 tolerances; TF32 (10-bit mantissas), which a training script may
    have switched on, would make both differ by ~1e-3. Uses PyTorch's per-backend
    ``fp32_precision`` settings where they exist (reading the legacy flags after a script set
    those raises), else the legacy flags.
    """
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        # mkldnn: "medium" precision lets oneDNN compute float32 matmuls in bfloat16 on a CPU
        settings = [backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn,
                    backends.mkldnn.matmul, backends.mkldnn.conv, backends.mkldnn.rnn]
        saved = [setting.fp32_precision for setting in settings]
        try:
            for setting in settings:
                setting.fp32_precision = "ieee"
            yield
        finally:
            for setting, value in zip(settings, saved):
                setting.fp32_precision = value
    else:  # PyTorch < 2.9
        precision, cudnn_tf32 = torch.get_float32_matmul_precision(), backends.cudnn.allow_tf32
        try:
            torch.set_float32_matmul_precision("highest")
            backends.cudnn.allow_tf32 = False
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
            backends.cudnn.allow_tf32 = cudnn_tf32
