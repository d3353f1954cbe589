"""Offline calibration documents: text a learned scorer is fitted on, never the benchmark's samples.

Three kinds, taken in turn so the fit sees each: natural-language docstrings from the standard library
(the bench's ``pydocs`` haystack, but from past its first 50,000 words, which no benchmark haystack up to
32k tokens reaches), Python source code, and the prose of the Python language reference (``pydoc_data``).
All of it ships with Python, so calibration needs no network and is the same on every machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from transformers import PreTrainedTokenizerBase

from kvsqueeze.bench.haystack import get_haystack_sentences, stdlib_source_files

KINDS = ("pydocs", "source", "reference")
PYDOCS_SKIP_WORDS = 50_000  # the bench's haystacks come from the corpus' start


def _pydocs_texts() -> Iterator[str]:
    sentences = get_haystack_sentences("pydocs", PYDOCS_SKIP_WORDS + 400_000)
    words = 0
    start = 0
    for i, sentence in enumerate(sentences):
        words += len(sentence.split())
        if words >= PYDOCS_SKIP_WORDS:
            start = i + 1
            break
    rest = sentences[start:]
    for i in range(0, len(rest), 150):
        yield " ".join(rest[i : i + 150])


def _source_texts() -> Iterator[str]:
    for path in reversed(stdlib_source_files()):  # from the end: the docstring corpus reads from the start
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 4000:
            yield text


def _reference_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if len(topics[name]) > 4000:
            yield topics[name]


def calibration_documents(tokenizer: PreTrainedTokenizerBase, count: int, tokens: int) -> list[list[int]]:
    """``count`` documents of exactly ``tokens`` token ids each (no special tokens), kinds in turn."""
    sources = [_pydocs_texts(), _source_texts(), _reference_texts()]
    documents: list[list[int]] = []
    for source in itertools.cycle(sources):
        if len(documents) >= count:
            break
        for text in source:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= tokens:
                documents.append(ids[:tokens])
                break
        else:
            raise ValueError(
                f"the offline corpus ran out after {len(documents)} documents of {tokens} tokens"
            )
    return documents
