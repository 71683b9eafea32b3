"""A snapshot's figures and token table for the Trainer's other reporting integrations.

Scalars reach every integration through its ``on_log``. Figures and text have no common
interface, so each integration that can show them gets them through its own client, once
the Trainer has set it up: Weights & Biases (``wandb.Image``, ``wandb.Html``, against the
Trainer's ``train/global_step``) and MLflow (``log_image`` with a step, ``log_text`` as an
artifact). Other integrations get the scalars only.
"""

from __future__ import annotations

import html
from typing import Any

from susc_callback.logging.tensorboard import SnapshotMedia


def send_media(reporters: list[Any], step: int, media: SnapshotMedia) -> list[str]:
    """Send ``media`` to every reporter in ``reporters`` that can show it; returns the names
    of those that got it."""
    sent = []
    for reporter in reporters:
        kind = type(reporter).__name__
        if kind == "WandbCallback" and _ready(reporter, "_wandb"):
            wandb = reporter._wandb
            wandb.log({**{tag: wandb.Image(image) for tag, image in media.images.items()},
                       **{tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")
                          for tag, text in media.texts.items()},
                       "train/global_step": step})
            sent.append(kind)
        elif kind == "MLflowCallback" and _ready(reporter, "_ml_flow"):
            for tag, image in media.images.items():  # synchronous: no lingering threads
                reporter._ml_flow.log_image(image, key=tag.replace("/", "_"), step=step,
                                            synchronous=True)
            for tag, text in media.texts.items():
                reporter._ml_flow.log_text(text, f"susceptibility/{tag.replace('/', '_')}"
                                                 f"_step{step}.md")
            sent.append(kind)
    return sent


def _ready(reporter: Any, client: str) -> bool:
    """The integration's client exists and the Trainer has set it up (it sets up on its
    first log, which comes before any snapshot after step 0)."""
    return getattr(reporter, client, None) is not None and getattr(reporter, "_initialized",
                                                                   False)
