"""RULER-style synthetic long-context tasks (needle retrieval, tracking, aggregation, QA).

Every task builds a :class:`Sample` whose ``context`` (the long document, to be compressed) is followed
by a ``question``; the question is never part of the context. The number of tokens of ``context`` plus
``question`` (each tokenized on its own, without special tokens, see :func:`sample_num_tokens`) is within
2% of the requested length, and never above it unless the task cannot be cut finer. Samples depend only
on (task, seed, sample index, length, haystack): every random choice comes from a per-sample
``random.Random``. Templates follow NVIDIA's RULER (Hsieh et al., 2024) in spirit.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvsqueeze.bench.haystack import ADJECTIVES, HAYSTACK_KINDS, NOUNS, VOCABULARY, Haystack

MIN_LENGTH = 256
LENGTH_TOLERANCE = 0.02
_AIM = 0.002  # stop searching once within 0.2% below the target


@dataclass(frozen=True)
class Sample:
    """One benchmark example.

    Attributes:
        task: task name (a key of :data:`TASKS` for generated samples).
        context: the long document; it does not contain the question.
        question: asked after the context (starts without leading whitespace).
        answers: expected strings; see :mod:`kvsqueeze.bench.scoring` for how they are matched.
        answer_prefix: text the assistant's reply starts with (may be empty).
        metadata: free-form details (``metric``, ``num_tokens``, needle depths, ...).
    """

    task: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.answers, list) or not self.answers:
            raise ValueError("answers must be a non-empty list of strings")
        if not all(isinstance(a, str) and a.strip() for a in self.answers):
            raise ValueError("every answer must be a non-empty string")


class Tokenizer(Protocol):
    """What the generators need from a tokenizer (a Hugging Face tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of ``text`` (plain tokenization, no special tokens, no chat template)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def sample_num_tokens(sample: Sample, tokenizer: Tokenizer) -> int:
    """Length of a sample: tokens of the context plus tokens of the question, tokenized separately."""
    return count_tokens(tokenizer, sample.context) + count_tokens(tokenizer, sample.question)


# --------------------------------------------------------------------------------------------------
# Length fitting

Build = Callable[[int], tuple[str, str]]  # units -> (context, question)


@dataclass
class _Spec:
    """A task instance before its length is fixed: ``build(units)`` grows with ``units``."""

    build: Build
    answers: list[str]
    answer_prefix: str
    max_units: int
    metadata: dict[str, Any]
    refine: Callable[[int], tuple[Build, int]] | None = None  # optional second, finer knob


def _fit(
    build: Build, tokenizer: Tokenizer, target: int, max_units: int, guess: int, *, strict: bool = True
) -> tuple[int, str, str, int]:
    """Find ``units`` so that ``build(units)`` is at most ``target`` tokens and as close to it as possible.

    Secant steps from below on a nearly linear function; usually 2-4 tokenizations. With ``strict``,
    a result more than 2% off the target raises ValueError; otherwise the best one below is returned.
    Returns (units, context, question, num_tokens).
    """
    cache: dict[int, tuple[int, str, str]] = {}

    def measure(units: int) -> int:
        if units not in cache:
            context, question = build(units)
            cache[units] = (
                count_tokens(tokenizer, context) + count_tokens(tokenizer, question),
                context,
                question,
            )
        return cache[units][0]

    aim = max(1, int(target * _AIM))
    base = measure(0)
    lo, lo_tokens = 0, base
    hi, hi_tokens = max_units + 1, math.inf
    units = min(max(guess, 1), max_units)
    while target - lo_tokens > aim and hi - lo > 1 and lo < max_units:
        tokens = measure(units)
        if tokens <= target:
            lo, lo_tokens = units, tokens
        else:
            hi, hi_tokens = units, tokens
        if hi_tokens < math.inf:
            slope = (hi_tokens - lo_tokens) / (hi - lo)
        else:
            slope = (lo_tokens - base) / lo if lo else 1.0
        step = int((target - lo_tokens) / max(slope, 1e-6))
        units = min(lo + max(step, 1), max_units)
        if units >= hi:
            units = (lo + hi) // 2
    best = lo, lo_tokens
    if (
        strict
        and lo_tokens < target * (1 - LENGTH_TOLERANCE)
        and hi_tokens <= target * (1 + LENGTH_TOLERANCE)
    ):
        best = hi, int(hi_tokens)
    units, tokens = best
    if abs(tokens - target) > target * LENGTH_TOLERANCE and (strict or tokens > target):
        raise ValueError(
            f"cannot reach length {target}: closest is {tokens} tokens"
            + (" (the task's fixed text alone is too long)" if base > target else "")
        )
    _, context, question = cache[units]
    return units, context, question, tokens


# --------------------------------------------------------------------------------------------------
# Helpers shared by the tasks


def _assemble(
    sentences: Sequence[str], inserts: Sequence[tuple[float, str]], *, paragraphs: bool = False
) -> str:
    """Haystack sentences with each insert (depth in [0, 1], text) at the nearest sentence boundary.

    Inserts at the same boundary keep their order of depth. With ``paragraphs`` each insert becomes its
    own paragraph; otherwise everything is joined with single spaces.
    """
    slots: dict[int, list[str]] = {}
    for depth, text in sorted(inserts, key=lambda item: item[0]):
        slots.setdefault(round(depth * len(sentences)), []).append(text)
    parts: list[list[str]] = [[]]
    for i in range(len(sentences) + 1):
        for text in slots.get(i, ()):
            if paragraphs:
                parts += [[text], []]
            else:
                parts[-1].append(text)
        if i < len(sentences):
            parts[-1].append(sentences[i])
    return "\n\n".join(" ".join(part) for part in parts if part)


def _compound_words(rng: random.Random, count: int, exclude: Sequence[str] = ()) -> list[str]:
    """Distinct "adjective-noun" strings such as "brave-lantern"."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        word = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _distinct(rng: random.Random, count: int, draw: Callable[[random.Random], str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = draw(rng)
        if value not in out:
            out.append(value)
    return out


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class Task(ABC):
    """A task generator; subclasses implement :meth:`prepare`."""

    name: str
    metric: str  # "all" or "part", see kvsqueeze.bench.scoring
    description: str = ""
    answer_tokens: int = 32  # tokens to generate for an answer (as RULER's per-task tokens_to_generate)

    @abstractmethod
    def prepare(
        self, rng: random.Random, length: int, haystack: Haystack | None, tokenizer: Tokenizer
    ) -> _Spec:
        """Draw this sample's random content and return its length-parametrised builder."""

    def haystack_words(self, length: int) -> int:
        """Words of filler needed for a context of ``length`` tokens (a word is at least one token)."""
        return length


# --------------------------------------------------------------------------------------------------
# Needle in a haystack


@dataclass
class NeedleTask(Task):
    """Needles "One of the special magic numbers for <key> is: <value>." hidden in filler text.

    ``num_keys`` needle keys (the others are distractors), ``num_values`` values per key, and the
    question asks for ``num_queries`` keys at once.
    """

    name: str
    value_kind: str = "number"  # number | uuid | word
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    description: str = ""

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "part" if self.num_values * self.num_queries == 1 else "all"

    @property
    def answer_tokens(self) -> int:  # type: ignore[override]
        per_value = 48 if self.value_kind == "uuid" else 16  # tokenizers may split digits one by one
        return 16 + per_value * self.num_values * self.num_queries

    def _values(self, rng: random.Random, count: int, keys: Sequence[str]) -> list[str]:
        if self.value_kind == "number":
            return _distinct(rng, count, lambda r: str(r.randint(10**6, 10**7 - 1)))
        if self.value_kind == "uuid":
            return _distinct(rng, count, _uuid)
        return _compound_words(rng, count, exclude=keys)

    def prepare(
        self, rng: random.Random, length: int, haystack: Haystack | None, tokenizer: Tokenizer
    ) -> _Spec:
        assert haystack is not None
        kind = self.value_kind
        keys = _compound_words(rng, self.num_keys)
        values = self._values(rng, self.num_keys * self.num_values, keys)
        needles = [
            (key, value, f"One of the special magic {kind}s for {key} is: {value}.")
            for k, key in enumerate(keys)
            for value in values[k * self.num_values : (k + 1) * self.num_values]
        ]
        rng.shuffle(needles)
        inserts = [(rng.random(), text) for _, _, text in needles]
        queried = keys[: self.num_queries]
        answers = [value for key, value, _ in needles if key in queried]
        if len(answers) == 1:
            question = f"What is the special magic {kind} for {queried[0]} mentioned in the provided text?"
            prefix = f"The special magic {kind} for {queried[0]} mentioned in the provided text is"
        else:
            names = _join_names(queried)
            question = f"What are all the special magic {kind}s for {names} mentioned in the provided text?"
            prefix = f"The special magic {kind}s for {names} mentioned in the provided text are"
        header = (
            f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind}s afterwards.\n"
        )

        def build(units: int) -> tuple[str, str]:
            return header + _assemble(haystack.take(units), inserts), question

        metadata = {"keys": keys, "queried_keys": queried, "depths": sorted(d for d, _ in inserts)}
        return _Spec(build, answers, prefix, haystack.num_words, metadata)


# --------------------------------------------------------------------------------------------------
# Variable tracking


@dataclass
class VariableTrackingTask(Task):
    """Chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... in filler; ask for all names of one value.

    Each assignment is its own paragraph by default: with the statements inline in the prose, the full
    cache of Qwen2.5-Coder-0.5B scored 40% at 4k tokens (2 samples), with them as paragraphs 100% (3).
    """

    name: str = "variable_tracking"
    num_chains: int = 1
    num_hops: int = 4
    paragraphs: bool = True  # each assignment in its own paragraph (False: inline in the prose)
    metric: str = "all"
    answer_tokens: int = 48
    description: str = "multi-hop tracing of variable assignments"

    def prepare(
        self, rng: random.Random, length: int, haystack: Haystack | None, tokenizer: Tokenizer
    ) -> _Spec:
        assert haystack is not None
        upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names = _distinct(
            rng, self.num_chains * (self.num_hops + 1), lambda r: "".join(r.choices(upper, k=5))
        )
        values = _distinct(rng, self.num_chains, lambda r: str(r.randint(10000, 99999)))
        chains = [
            names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)] for c in range(self.num_chains)
        ]
        inserts: list[tuple[float, str]] = []
        for chain, value in zip(chains, values, strict=True):
            statements = [f"VAR {chain[0]} = {value}."]
            statements += [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(self.num_hops)]
            depths = sorted(rng.random() for _ in statements)
            inserts += zip(depths, statements, strict=True)
        answers, value = chains[0], values[0]
        header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(answers)} variables are assigned the value {value}, they are:"
        )

        def build(units: int) -> tuple[str, str]:
            return header + _assemble(haystack.take(units), inserts, paragraphs=self.paragraphs), question

        metadata = {"value": value, "chains": chains, "depths": sorted(d for d, _ in inserts)}
        return _Spec(build, list(answers), prefix, haystack.num_words, metadata)


# --------------------------------------------------------------------------------------------------
# Common words extraction


@dataclass
class CommonWordsTask(Task):
    """A numbered word list in which ``num_common`` words are much more frequent; ask for them.

    Frequencies follow RULER (common x30 / others x3 from 4k tokens, x6 / x1 below) and are raised
    together when the vocabulary is too small for the length. The haystack is not used. One item per
    line by default: the full cache of Qwen2.5-Coder-0.5B scored 63% at 4k tokens with the items on one
    line and 80% with one per line (3 samples).
    """

    name: str = "common_words"
    num_common: int = 10
    one_per_line: bool = True  # "1. word\n2. word" (False: "1. word 2. word" on one line)
    metric: str = "all"
    answer_tokens: int = 96
    description: str = "aggregation: the most frequent words of a list"

    @staticmethod
    def _frequencies(length: int, tokens_per_item: float, num_rare: int) -> tuple[int, int]:
        """(common, rare) repetitions; both grow when the vocabulary cannot fill ``length`` otherwise."""
        common, rare = (3, 1) if length < 1024 else (6, 1) if length < 4096 else (30, 3)
        needed = math.ceil(1.25 * length / tokens_per_item / num_rare)
        return (common, rare) if needed <= rare else (max(common, 10 * needed), needed)

    def prepare(
        self, rng: random.Random, length: int, haystack: Haystack | None, tokenizer: Tokenizer
    ) -> _Spec:
        words = list(VOCABULARY)
        rng.shuffle(words)
        common, rare = words[: self.num_common], words[self.num_common :]
        probe = " ".join(f"{1000 + i}. {w}" for i, w in enumerate(rare[:50]))
        tokens_per_item = count_tokens(tokenizer, probe) / 50
        common_freq, rare_freq = self._frequencies(length, tokens_per_item, len(rare))
        shuffle_seed = rng.getrandbits(64)
        header = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n"
        )
        question = f"Question: What are the {self.num_common} most common words in the above list?"
        prefix = f"Answer: The top {self.num_common} words that appear most often in the list are:"

        def build(units: int) -> tuple[str, str]:
            items = common * common_freq + rare[:units] * rare_freq
            random.Random(shuffle_seed).shuffle(items)
            separator = "\n" if self.one_per_line else " "
            return header + separator.join(f"{i}. {w}" for i, w in enumerate(items, start=1)), question

        metadata = {"common_frequency": common_freq, "rare_frequency": rare_freq}
        return _Spec(build, common, prefix, len(rare), metadata)

    def haystack_words(self, length: int) -> int:
        return 0


# --------------------------------------------------------------------------------------------------
# Key-value retrieval


@dataclass
class KVRetrievalTask(Task):
    """A JSON object of uuid keys to uuid values; ask for the value of one key.

    The number of pairs sets the length in steps of one pair (tens of tokens); the remainder is filled
    with haystack words between the instruction and the JSON data, so the length is still exact.
    """

    name: str = "kv_retrieval"
    metric: str = "part"
    answer_tokens: int = 64
    description: str = "retrieve a uuid value from a large JSON object"

    def prepare(
        self, rng: random.Random, length: int, haystack: Haystack | None, tokenizer: Tokenizer
    ) -> _Spec:
        assert haystack is not None
        max_pairs = length // 16 + 1
        pairs = [(_uuid(rng), _uuid(rng)) for _ in range(max_pairs + 1)]
        depth = rng.random()
        key, value = pairs[0]
        instruction = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        question = (
            f'Key: "{key}"\nWhat is the value associated with the specified key in the JSON data above?'
        )
        prefix = "The value associated with the specified key is:"

        def records(units: int) -> str:
            distractors = pairs[1 : units + 1]
            at = round(depth * units)
            return json.dumps(dict(distractors[:at] + [pairs[0]] + distractors[at:]), indent=1)

        def build(units: int) -> tuple[str, str]:
            return f"{instruction}JSON data:\n{records(units)}", question

        def refine(units: int) -> tuple[Build, int]:
            data = records(units)

            def padded(words: int) -> tuple[str, str]:
                pad = " ".join(haystack.take(words)) + "\n\n" if words else ""
                return f"{instruction}{pad}JSON data:\n{data}", question

            return padded, haystack.num_words

        metadata = {"key": key, "depth": depth}
        return _Spec(build, [value], prefix, max_pairs, metadata, refine=refine)

    def haystack_words(self, length: int) -> int:
        return min(length, 400)


# --------------------------------------------------------------------------------------------------
# Question answering over generated documents


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(","))


_ONSETS = _split("b, br, c, cr, d, dr, f, g, gr, h, k, l, m, n, p, r, s, st, t, th, tr, v, z")
_VOWELS = _split("a, e, i, o, u, ai, ea, ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "x", "m")
_PROFESSIONS = _split(
    "lighthouse keeper, glassblower, cartographer, beekeeper, clockmaker, botanist, tailor, blacksmith, "
    "violin maker, ferry captain, pastry chef, stonemason, bookbinder, puppeteer, astronomer, watchmaker"
)
_INSTRUMENTS = _split(
    "cello, harmonica, accordion, bassoon, banjo, harp, oboe, trombone, mandolin, xylophone, bagpipes, clarinet"
)
_LANDMARKS = _split(
    "copper bell tower, floating market, glass bridge, marble amphitheater, salt caves, stone lighthouse, "
    "clock museum, hanging gardens, iron observatory, painted stairway"
)
_DISHES = _split(
    "smoked eel pie, plum dumplings, saffron bread, walnut soup, honey-glazed trout, barley stew, "
    "fig pancakes, pepper crab, chestnut cake, lemon rice"
)
_PRODUCTS = _split(
    "folding bicycles, wind turbines, ceramic teapots, solar lanterns, pipe organs, hiking boots, "
    "typewriters, weather balloons, sailcloth, music boxes"
)
_COMPANY_SUFFIXES = _split("Industries, Works, Systems, Company, Labs, Trading House")


def _made_up_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


class _Draws:
    """Draws without repetition inside one sample, so facts never collide across documents."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def pick(self, pool: Sequence[str]) -> str:
        return self._unique(lambda: self.rng.choice(pool))

    def name(self, parts: int = 1) -> str:
        return self._unique(
            lambda: " ".join(_made_up_word(self.rng, self.rng.randint(2, 3)) for _ in range(parts))
        )

    def year(self) -> str:
        return self._unique(lambda: str(self.rng.randint(1650, 1990)))

    def _unique(self, draw: Callable[[], str]) -> str:
        while True:
            value = draw()
            clash = any(value.lower() in u.lower() or u.lower() in value.lower() for u in self.used)
            if not clash:
                self.used.add(value)
                return value


def _person(d: _Draws) -> tuple[str, list[tuple[str, str]]]:
    name, year, town, job, instrument, pet = (
        d.name(2),
        d.year(),
        d.name(),
        d.pick(_PROFESSIONS),
        d.pick(_INSTRUMENTS),
        d.name(),
    )
    text = (
        f"{name} was born in {year} in the town of {town}. {name} worked as a {job} for most of their life "
        f"and spent the evenings playing the {instrument}. {name} once owned a dog named {pet}."
    )
    questions = [
        (f"In which year was {name} born?", year),
        (f"In which town was {name} born?", town),
        (f"What was the profession of {name}?", job),
        (f"Which instrument did {name} play?", instrument),
        (f"What was the name of the dog owned by {name}?", pet),
    ]
    return text, questions


def _city(d: _Draws) -> tuple[str, list[tuple[str, str]]]:
    city, river, year, landmark, dish = d.name(), d.name(), d.year(), d.pick(_LANDMARKS), d.pick(_DISHES)
    text = (
        f"{city} is a city on the banks of the {river} River. It was founded in {year} and is famous for "
        f"its {landmark}. Visitors to {city} are always served the local specialty, {dish}."
    )
    questions = [
        (f"Which river flows through the city of {city}?", river),
        (f"In which year was the city of {city} founded?", year),
        (f"What landmark is the city of {city} famous for?", landmark),
        (f"What is the local specialty of {city}?", dish),
    ]
    return text, questions


def _company(d: _Draws) -> tuple[str, list[tuple[str, str]]]:
    company = f"{d.name()} {d.rng.choice(_COMPANY_SUFFIXES)}"
    hq, year, founder, product = d.name(), d.year(), d.name(2), d.pick(_PRODUCTS)
    text = (
        f"{company} is a company headquartered in the city of {hq}. It was founded in {year} by {founder}, "
        f"and its best-selling products are {product}."
    )
    questions = [
        (f"In which city is {company} headquartered?", hq),
        (f"In which year was {company} founded?", year),
        (f"Who founded {company}?", founder),
        (f"What are the best-selling products of {company}?", product),
    ]
    return text, questions


@dataclass
class QAGeneratedTask(Task):
    """Short documents about fictitious people, cities and companies hidden in filler; ask about one fact."""

    name: str = "qa_generated"
    metric: str = "part"
    description: str = "question answering over generated documents among distractors"

    def prepare(
        self, rng: random.Random, length: int, haystack: Haystack | None, tokenizer: Tokenizer
    ) -> _Spec:
        assert haystack is not None
        draws = _Draws(rng)
        num_docs = max(2, min(10, length // 400))
        makers = [_person, _city, _company]
        docs = [makers[i % len(makers)](draws) for i in range(num_docs)]
        gold = rng.randrange(num_docs)
        query, answer = rng.choice([(q, a) for q, a in docs[gold][1] if a.lower() not in q.lower()])
        depths = sorted(rng.random() for _ in docs)
        order = list(range(num_docs))
        rng.shuffle(order)  # order[k] = document placed k-th
        inserts = [(depths[k], f"Document {k + 1}: {docs[i][0]}") for k, i in enumerate(order)]
        instruction = (
            "Answer the question based on the given documents. "
            "Only give me the answer and do not output any other words."
        )
        header = (
            f"{instruction}\n\nThe following text contains {num_docs} short documents, "
            "separated by unrelated text.\n\n"
        )
        question = f"{instruction}\n\nQuestion: {query}"

        def build(units: int) -> tuple[str, str]:
            return header + _assemble(haystack.take(units), inserts, paragraphs=True), question

        metadata = {
            "gold_document": order.index(gold) + 1,
            "depth": depths[order.index(gold)],
            "num_documents": num_docs,
        }
        return _Spec(build, [answer], "Answer:", haystack.num_words, metadata)


# --------------------------------------------------------------------------------------------------
# Registry and entry point

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        NeedleTask("niah_single_number", "number", description="one needle, 7-digit number value"),
        NeedleTask("niah_single_uuid", "uuid", description="one needle, uuid value"),
        NeedleTask("niah_single_word", "word", description="one needle, word value"),
        NeedleTask("niah_multikey", "number", num_keys=4, description="one of 4 needles with different keys"),
        NeedleTask(
            "niah_multivalue", "number", num_values=4, description="one key with 4 values, return all"
        ),
        NeedleTask(
            "niah_multiquery", "number", num_keys=4, num_queries=4, description="4 keys asked at once"
        ),
        VariableTrackingTask(),
        CommonWordsTask(),
        KVRetrievalTask(),
        QAGeneratedTask(),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name`` (ValueError listing the valid names otherwise)."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def generate_samples(
    task: str,
    tokenizer: Tokenizer,
    *,
    length: int,
    num_samples: int,
    seed: int,
    haystack: str = "pydocs",
) -> list[Sample]:
    """Generate ``num_samples`` deterministic samples of ``task`` with ``length`` tokens each.

    Args:
        task: a name from :data:`TASKS`.
        tokenizer: the model's tokenizer; lengths are measured with it (see :func:`sample_num_tokens`).
        length: target tokens of context + question (>= 256); samples land within 2% of it.
        num_samples: how many samples (>= 1).
        seed: samples depend only on (task, seed, index, length, haystack).
        haystack: filler text: "pydocs" (natural prose, offline), "repeat" (RULER noise) or "essay"
            (a prose file named by $KVSQUEEZE_ESSAY_FILE); see :mod:`kvsqueeze.bench.haystack`.
    """
    spec_task = get_task(task)
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise ValueError(f"length must be an integer >= {MIN_LENGTH}, got {length!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if haystack not in HAYSTACK_KINDS:
        raise ValueError(f"unknown haystack {haystack!r}; valid haystacks: {', '.join(HAYSTACK_KINDS)}")
    words = spec_task.haystack_words(length)
    filler = Haystack.load(haystack, words) if words else None
    samples: list[Sample] = []
    guesses = [1, 1]
    for index in range(num_samples):
        rng = random.Random(f"kvsqueeze-bench:{task}:{seed}:{index}")
        spec = spec_task.prepare(rng, length, filler, tokenizer)
        units, context, question, tokens = _fit(
            spec.build, tokenizer, length, spec.max_units, guesses[0], strict=spec.refine is None
        )
        guesses[0] = units
        extra: dict[str, Any] = {}
        if spec.refine is not None:
            finer, max_finer = spec.refine(units)
            extra["pad_words"], context, question, tokens = _fit(
                finer, tokenizer, length, max_finer, guesses[1]
            )
            guesses[1] = max(extra["pad_words"], 1)
        metadata = {
            "index": index,
            "seed": seed,
            "length": length,
            "num_tokens": tokens,
            "units": units,
            "haystack": haystack if filler is not None else None,
            "metric": spec_task.metric,
            **spec.metadata,
            **extra,
        }
        samples.append(Sample(task, context, question, spec.answers, spec.answer_prefix, metadata))
    return samples
