"""A multi-domain corpus from the local Python installation, a tokenizer, and probe tags.

Every machine with Python carries real text, so the demo needs nothing from a hub:

* ``code``: the standard library's source files;
* ``prose``: the ``pydoc_data`` topics (the language reference) and stdlib docstrings;
* ``legal``: Python's own licence and the licence files of the project's dependencies;
* ``induction``: random tokens repeated with a period of 8-40, learnable only by induction.

Documents are split into training and held-out parts by a seeded permutation, so the same
seed on the same installation gives the same corpus. A byte-level BPE tokenizer is trained
on the training text and cached. (Probe tokens are tagged by
pattern with the library's :func:`susc_callback.clusters.tag_tokens`.)
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DOMAINS = ("code", "prose", "legal")
DEPENDENCIES = ("torch", "transformers", "accelerate", "numpy", "scikit-learn", "scipy",
                "tensorboard", "safetensors", "tqdm", "matplotlib", "tokenizers")


@dataclass
class Corpus:
    """``{domain: [document text]}`` for training and held-out use."""

    train: dict[str, list[str]]
    held_out: dict[str, list[str]]


def build_corpus(seed: int = 0, held_out_fraction: float = 0.1) -> Corpus:
    """The three natural domains from this Python installation, split per document."""
    documents = {"code": _code_documents(), "prose": _prose_documents(),
                 "legal": _legal_documents()}
    rng = random.Random(seed)
    train, held_out = {}, {}
    for domain, texts in documents.items():
        texts = list(dict.fromkeys(texts))  # the stdlib repeats some docstrings verbatim
        order = list(range(len(texts)))
        rng.shuffle(order)
        cut = max(1, int(round(held_out_fraction * len(texts))))
        held_out[domain] = [texts[i] for i in order[:cut]]
        train[domain] = [texts[i] for i in order[cut:]]
    return Corpus(train, held_out)


def _code_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [_read(p) for p in sorted(root.glob("*.py")) if _read(p)]


def _prose_documents() -> list[str]:
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    docstrings = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(_read(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 200:
                    docstrings.append(text)
    return topics + docstrings


def _legal_documents() -> list[str]:
    texts = []
    python_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_licence.is_file():
        texts.append(_read(python_licence))
    for name in DEPENDENCIES:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in sorted(files, key=str):
            upper = file.name.upper()
            if any(key in upper for key in ("LICENSE", "LICENCE", "COPYING", "NOTICE")):
                text = _read(Path(file.locate()))
                if len(text) >= 200:
                    texts.append(text)
    return texts


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def train_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path):
    """A byte-level BPE tokenizer trained on the training text, cached by content hash."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [t for domain in DOMAINS for t in corpus.train[domain]]
    digest = hashlib.sha256(f"{vocab_size}".encode())
    for text in texts:
        digest.update(text.encode())
    path = Path(cache_dir) / f"tokenizer-{vocab_size}-{digest.hexdigest()[:12]}"
    if not (path / "tokenizer.json").is_file():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                       bos_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast.save_pretrained(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def token_windows(texts: list[str], tokenizer, length: int, count: int,
                  generator: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``length`` tokens cut at random places of the texts' stream."""
    separator = [tokenizer.eos_token_id]
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + separator
    stream = torch.tensor(stream, dtype=torch.long)
    starts = torch.randint(0, len(stream) - length, (count,), generator=generator)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def repeated_sequences(count: int, length: int, vocab: int, generator: torch.Generator,
                       periods: tuple[int, int] = (8, 40)) -> torch.Tensor:
    """Random tokens repeating with a random period in ``periods``: after the first period
    every token is predictable by induction."""
    rows = []
    for _ in range(count):
        period = int(torch.randint(periods[0], periods[1] + 1, (1,), generator=generator))
        unit = torch.randint(0, vocab, (period,), generator=generator)
        rows.append(unit.repeat(length // period + 1)[:length])
    return torch.stack(rows)
