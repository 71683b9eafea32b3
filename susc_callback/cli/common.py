"""What the ``susc`` commands share: loading checkpoints and tokenizers, SGLD flags."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args, get_type_hints

import torch

from susc_callback.config import CHOICES, SGLDConfig
from susc_callback.store.files import ResultFileError


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def load_tokenizer(name: str | None, run_dir: Path, checkpoints: dict[int, Path]) -> object:
    from transformers import AutoTokenizer

    candidates = [name] if name else [run_dir, *checkpoints.values()]
    for candidate in candidates:
        try:
            return AutoTokenizer.from_pretrained(str(candidate))
        except Exception as error:  # noqa: BLE001 - try the next place, report if named
            if name:
                raise CommandError(f"cannot load tokenizer {name}: {error}") from error
    return None


def load_model(path: Path, tokenizer: object | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))  # sampled in float32
    except Exception as error:
        raise CommandError(f"checkpoint {path} is unreadable: {error}") from error
    vocab = getattr(model.config, "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise CommandError(f"the tokenizer has {len(tokenizer)} tokens but {path.name}'s model "
                           f"has a vocabulary of {vocab}: mismatched tokenizer")
    return model.eval()


def sgld_config(args: argparse.Namespace) -> SGLDConfig:
    values = json.loads(Path(args.config).read_text()) if args.config else {}
    values.update({name: getattr(args, name) for name in config_flags()
                   if getattr(args, name) is not None})
    values["progress"] = False if args.no_progress else True if sys.stderr.isatty() \
        else "lines"  # a log or a pipe gets a plain line every 30 s
    values.setdefault("on_divergence", "mark")  # a diverged head is saved as failed
    return SGLDConfig.from_dict(values)


def config_flags() -> dict[str, dict]:
    """``add_argument`` options of a flag per ``SGLDConfig`` field (``progress`` is
    ``--no-progress``): the field's type or choices, and its help text."""
    hints = get_type_hints(SGLDConfig)
    flags = {}
    for name, help_text in SGLDConfig.field_help().items():
        if name == "progress":
            continue
        options: dict = {"help": help_text.replace("%", "%%")}
        kinds = [kind for kind in get_args(hints[name]) if kind is not type(None)]
        kind = kinds[0] if kinds else hints[name]
        if name in CHOICES:
            options["choices"] = CHOICES[name]
        elif kind is bool:
            options["type"] = boolean
        elif len(kinds) > 1:  # int | Literal["auto"]
            options["type"] = int_or(*get_args(kinds[1]))
        else:
            options["type"] = kind
        flags[name] = options
    return flags


def boolean(text: str) -> bool:
    """An argparse type: true/false (also yes/no, 1/0)."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")
    return words[text.lower()]


def int_or(*words: str) -> Callable[[str], int | str]:
    """An argparse type: an integer, or one of ``words``."""
    def parse(text: str) -> int | str:
        if text in words:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer or one of {', '.join(words)}, got {text!r}") from None
    return parse


def announce_start(step: int, index: int, total: int) -> float:
    """Print that checkpoint ``index`` of ``total`` (at ``step``) is being estimated;
    returns the start time."""
    print(f"step {step}: estimating (checkpoint {index} of {total})", flush=True)
    return time.perf_counter()


def announce_saved(step: int, path: Path, start: float) -> None:
    print(f"step {step}: saved {path} ({time.perf_counter() - start:.0f} s)", flush=True)


def skip_damaged(step: int, error: ResultFileError) -> None:
    """Name a damaged result that is left out of a series (``--keep-going``)."""
    print(f"step {step}: skipped, {error}", file=sys.stderr)
