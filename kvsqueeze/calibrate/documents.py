"""Offline calibration documents: text a learned scorer is fitted on, never the benchmark's samples.

Three kinds, taken in turn so the fit sees each: natural-language docstrings from the standard library
(the bench's ``pydocs`` haystack, but from past its first 50,000 words, which no benchmark haystack up to
32k tokens reaches), Python source code, and the prose of the Python language reference (``pydoc_data``).
All of it ships with Python, so calibration needs no network and is the same on every machine.
"""

from __future__ import annotations

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


def _documents_of_kind(
    texts: Iterator[str], tokenizer: PreTrainedTokenizerBase, tokens: int
) -> Iterator[list[int]]:
    """Documents of ``tokens`` ids from one kind's texts: the first ``tokens`` ids of each text that long,
    in order; once those run out, the shorter texts joined in order (a blank line apart) and cut."""
    short: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= tokens:
            yield ids[:tokens]
        else:
            short.append(ids)
    separator = tokenizer.encode("\n\n", add_special_tokens=False)
    joined: list[int] = []
    for ids in short:
        joined += ids + separator
        while len(joined) >= tokens:
            yield joined[:tokens]
            joined = joined[tokens:]


def calibration_documents(tokenizer: PreTrainedTokenizerBase, count: int, tokens: int) -> list[list[int]]:
    """``count`` documents of exactly ``tokens`` token ids each (no special tokens), kinds in turn.

    A kind that has run out of texts of ``tokens`` ids joins its shorter ones, so long documents exist
    too; a kind with nothing left is skipped."""
    kinds = [
        _documents_of_kind(texts, tokenizer, tokens)
        for texts in (_pydocs_texts(), _source_texts(), _reference_texts())
    ]
    documents: list[list[int]] = []
    while kinds and len(documents) < count:
        for kind in list(kinds):
            if len(documents) >= count:
                break
            document = next(kind, None)
            if document is None:
                kinds.remove(kind)
            else:
                documents.append(document)
    if len(documents) < count:
        raise ValueError(f"the offline corpus ran out after {len(documents)} documents of {tokens} tokens")
    return documents
