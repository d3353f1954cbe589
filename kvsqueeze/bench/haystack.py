"""Filler text ("haystacks") and word lists for the synthetic long-context tasks.

Haystack kinds:

* ``repeat``: RULER's repeated noise, "The grass is green. The sky is blue. ...".
* ``pydocs``: natural English prose taken from the docstrings of Python's standard library. The source
  files are read in sorted order and parsed with :mod:`ast` (nothing is imported, so no module side
  effects), docstrings are cleaned with :func:`inspect.cleandoc` and filtered to plain ASCII prose
  sentences. The text is the same on every run with the same Python installation; it is collected
  lazily and cached in this module.
* ``essay``: any prose you supply (e.g. RULER's Paul Graham essays, which cannot be downloaded here):
  the path of a UTF-8 text file (or a JSON file with a ``"text"`` field) in ``$KVSQUEEZE_ESSAY_FILE``.

A haystack is handled as a list of sentences; when more text is requested than the source has, the
sentences are cycled.
"""

from __future__ import annotations

import ast
import bisect
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from itertools import accumulate
from pathlib import Path

HAYSTACK_KINDS = ("essay", "pydocs", "repeat")
ESSAY_ENV_VAR = "KVSQUEEZE_ESSAY_FILE"

REPEAT_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words of ``text``, duplicates removed, order kept."""
    return tuple(dict.fromkeys(text.split()))


# Standard-library parts that are optional in some distributions (e.g. Debian splits them into separate
# packages) or whose text is not prose; leaving them out keeps the corpus the same across installs.
_EXCLUDED_MODULES = frozenset(
    _words("__hello__ __phello__ antigravity distutils ensurepip idlelib lib2to3 test this tkinter")
    + _words("turtle turtledemo venv")
)
_EXCLUDED_DIRS = frozenset({"__pycache__", "idle_test", "test", "tests"})

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(
    r">>>|\.\.\.|::|[{}\[\]=`\\|*#%<>@$~^_]|\w\(|\bself\b|\b(?!e\.g|i\.e)\w+\.\w|[A-Z][a-z]+[A-Z]"
)


def _is_prose(sentence: str) -> bool:
    """Whether a docstring sentence reads as plain English prose (no code, markup or identifiers)."""
    if not sentence.isascii() or not sentence[0].isupper() or not sentence.endswith("."):
        return False
    if not 4 <= len(sentence.split()) <= 60 or _CODE_LIKE.search(sentence):
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) > 0.9


def _docstring_sentences(source: str) -> Iterator[str]:
    """Prose sentences of all module, class and function docstrings in a source file."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)  # cleaned with inspect.cleandoc
        if not doc:
            continue
        for paragraph in re.split(r"\n\s*\n", doc):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):  # indented: code sample or parameter table
                continue
            text = " ".join(line.strip() for line in lines)
            for sentence in _SENTENCE_SPLIT.split(text):
                sentence = sentence.strip()
                if sentence and _is_prose(sentence):
                    yield sentence


def stdlib_source_files() -> list[Path]:
    """Source files of the pure-Python standard library, in sorted module-name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in sorted(set(sys.stdlib_module_names) - _EXCLUDED_MODULES):
        package = root / name
        if package.is_dir() and (package / "__init__.py").is_file():
            for folder, dirs, names in os.walk(package):
                dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS)
                files.extend(Path(folder) / f for f in sorted(names) if f.endswith(".py"))
        elif (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
    return files


class _PydocsCorpus:
    """Lazily collected, de-duplicated docstring sentences (one per process)."""

    def __init__(self) -> None:
        self.sentences: list[str] = []
        self.num_words = 0
        self._seen: set[str] = set()
        self._pending: list[Path] | None = None

    def ensure(self, min_words: int) -> None:
        """Read more source files until the corpus has ``min_words`` words or the library is exhausted."""
        if self._pending is None:
            self._pending = stdlib_source_files()[::-1]
        while self.num_words < min_words and self._pending:
            path = self._pending.pop()
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for sentence in _docstring_sentences(source):
                if sentence not in self._seen:
                    self._seen.add(sentence)
                    self.sentences.append(sentence)
                    self.num_words += len(sentence.split())


_PYDOCS = _PydocsCorpus()


def _essay_sentences() -> list[str]:
    path = os.environ.get(ESSAY_ENV_VAR)
    if not path or not Path(path).is_file():
        raise ValueError(
            f"haystack 'essay' needs a prose file: set ${ESSAY_ENV_VAR} to a text or JSON {{\"text\": ...}} "
            f"file (got {path!r}); offline alternatives: 'pydocs', 'repeat'"
        )
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        try:
            text = json.loads(text)["text"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"essay file {path}: expected a JSON object with a 'text' string") from exc
    sentences = [s.strip() for s in _SENTENCE_SPLIT.split(" ".join(text.split())) if s.strip()]
    if not sentences:
        raise ValueError(f"essay file {path} contains no text")
    return sentences


def _source_sentences(kind: str, min_words: int) -> Sequence[str]:
    if kind == "repeat":
        return _SENTENCE_SPLIT.split(REPEAT_TEXT)
    if kind == "pydocs":
        _PYDOCS.ensure(min_words)
        if not _PYDOCS.sentences:
            raise ValueError("haystack 'pydocs': no docstrings found in the standard library sources")
        return _PYDOCS.sentences
    if kind == "essay":
        return _essay_sentences()
    raise ValueError(f"unknown haystack {kind!r}; valid haystacks: {', '.join(HAYSTACK_KINDS)}")


def get_haystack_sentences(kind: str, min_words: int) -> list[str]:
    """Sentences of haystack ``kind`` holding at least ``min_words`` words (the source is cycled if short)."""
    source = _source_sentences(kind, min_words)
    sentences: list[str] = []
    words = 0
    while words < min_words:
        for sentence in source:
            sentences.append(sentence)
            words += len(sentence.split())
            if words >= min_words:
                break
    return sentences


def get_haystack_text(kind: str, min_chars: int) -> str:
    """Haystack text of the given kind with at least ``min_chars`` characters (whole sentences)."""
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    source = _source_sentences(kind, min_chars // 2 + 1)  # a word and its space take >= 2 characters
    out: list[str] = []
    chars = -1
    while chars < min_chars:
        for sentence in source:
            out.append(sentence)
            chars += len(sentence) + 1
            if chars >= min_chars:
                break
    return " ".join(out)


class Haystack:
    """A sentence sequence that can be cut to an exact number of words.

    ``take(n)`` returns the sentences covering the first ``n`` words; the last one may be cut mid-way,
    which gives word-level (about one token) control over the length of the generated context.
    """

    def __init__(self, sentences: Sequence[str]) -> None:
        self.sentences = list(sentences)
        self._cumulative = list(accumulate(len(s.split()) for s in self.sentences))

    @classmethod
    def load(cls, kind: str, min_words: int) -> Haystack:
        """Haystack of ``kind`` with at least ``min_words`` words."""
        return cls(get_haystack_sentences(kind, min_words))

    @property
    def num_words(self) -> int:
        """Total number of words available."""
        return self._cumulative[-1] if self._cumulative else 0

    def take(self, num_words: int) -> list[str]:
        """The first ``num_words`` words as a list of sentences (the last may be a fragment)."""
        if num_words > self.num_words:
            raise ValueError(f"haystack has {self.num_words} words, {num_words} requested")
        full = bisect.bisect_right(self._cumulative, num_words)
        out = self.sentences[:full]
        done = self._cumulative[full - 1] if full else 0
        if num_words > done:
            out.append(" ".join(self.sentences[full].split()[: num_words - done]))
        return out


# Common English words (hand-picked, lowercase, one token or a few) used for keys, values and the
# common-words task. Compound "adjective-noun" keys give plenty of distinct, unambiguous strings.
NOUNS = _words(
    """
    acorn actor airport album anchor angle ankle apple apron arch arena armchair arrow atlas attic
    avenue award badge bakery balcony ballet balloon bamboo banana bandage banjo banner barn barrel
    basket bathtub beach beacon beard bed bee beetle bell bench bicycle biscuit blanket blossom boat
    bonnet book boot bottle boulder bowl bracelet branch bread breeze brick bridge broom bubble bucket
    buffalo bugle butter button cabin cabinet cactus cake camel camera candle canoe canyon captain
    carpet carrot castle cathedral cattle cave cellar chair chalk champion chapel cheese cherry chess
    chimney chisel circus citizen clock cloud clover coast cobweb coconut coffee collar comet compass
    cookie copper corner cottage cotton cousin crayon creek cricket crown crystal cupboard curtain
    cushion daisy dancer desert diamond dinosaur doctor dolphin donkey dragon drawer dream drum duck
    eagle easel elephant elbow emerald engine envelope falcon farmer feather fence ferry festival
    fiddle flag flamingo flute forest fossil fountain fox frog galaxy garden garlic gate giraffe glacier
    glove goat gondola gorilla grape grasshopper gravel guitar hammer hammock harbor harp harvest hat
    hedge helmet heron hill honey horizon horse hospital island jacket jaguar jelly jewel journal jungle
    kangaroo kettle kitchen kite knight ladder lagoon lake lamp lantern lemon leopard library lighthouse
    lily lion lizard lobster locket lumber magnet mango maple marble market meadow melon mermaid meteor
    mirror mitten monkey moose mountain muffin museum mushroom napkin necklace needle nest nickel
    notebook novel oak oasis ocean octopus olive onion orange orchard orchestra ostrich otter owl oyster
    paddle palace panther parade parrot pasta peach peacock peanut pearl pebble pelican pencil penguin
    pepper piano pickle pigeon pillow pilot pine pineapple pirate planet plum pocket poem pony poppy
    porch potato pottery pumpkin puppet puzzle pyramid quilt rabbit raccoon radio raft rainbow raven
    reef ribbon river robin rocket rooster rose ruby saddle sailor salmon sandal saucer scarf scooter
    sculpture seal shadow shark sheep shell shovel skate sled snail sparrow spider spoon squirrel stable
    stadium statue stone storm stove strawberry submarine sunflower swan sweater table tablet teacup
    telescope temple tent theater thistle thunder tiger timber toaster tomato tower tractor trumpet
    tulip tunnel turkey turtle umbrella unicorn valley vase velvet village violin volcano wagon walnut
    walrus wardrobe waterfall whale wheat whistle willow window wizard wolf yacht zebra
    """
)
ADJECTIVES = _words(
    """
    able adorable agile amber ancient angry anxious arctic ashen awkward bashful bitter bland blazing
    bold brave breezy bright brisk broad bronze bumpy busy calm careful cheerful chilly classic clever
    cloudy clumsy cozy crimson crisp crooked cruel curious curly damp daring dazzling deep delicate
    dense dizzy drowsy dusty eager early earnest elegant empty endless faded faint famous fancy fearless
    fierce fluffy foggy fragile frantic friendly frosty frozen gentle giant gifted glad gleaming gloomy
    glossy golden graceful grand grateful greedy grumpy hasty hidden hollow honest humble hungry icy
    idle jolly joyful juicy keen kind lazy little lively lonely loyal lucky lumpy magnetic majestic
    mellow merry mighty misty modern modest muddy mysterious narrow nervous noble noisy nimble odd
    orderly ornate pale patient peaceful perfect playful pleasant polite proud purple quaint quick quiet
    radiant rapid rare restless rich rocky rosy rough royal rugged rusty sandy scarlet secret serene
    shaggy sharp shiny silent silky silly sleek sleepy slender slim smooth snowy soft sparkling speedy
    spicy splendid steady sticky stormy striped sturdy sunny superb swift tall tender thirsty tidy timid
    tiny tranquil tricky twisted upbeat vast velvety vivid wandering warm wary weary whimsical wicked
    wild windy wise witty wooden worried young zealous
    """
)
VERBS = _words(
    """
    accept admire advise allow amuse answer arrange arrive bake balance bathe begin behave belong bless
    blink boil borrow bounce breathe build bury calculate carry carve catch celebrate chase cheer chew
    clap climb collect comfort compare complain connect consider cook count crawl cross dance decide
    deliver describe design dive divide drift earn educate embrace encourage enjoy escape examine
    explain explore fasten fetch fill float fold follow forgive gallop gather glide glow grab greet grin
    guard guess guide hammer handle hang harvest heal hike hover hug hunt hurry imagine improve include
    inform inspect invent invite juggle jump kneel knit knock laugh launch lead learn lift listen
    manage march measure melt mend mix nod notice obey observe offer open order paddle paint pause
    perform persuade plant play pledge polish pour practice praise prepare preserve promise protect pull
    punish question race rattle reach read realize receive recite relax remember repair repeat rescue
    retire return ride rinse roar roll rush sail scatter scream search settle shiver sing sketch skip
    slide smile sneeze sparkle spill spray sprint squeeze stamp stir stretch stroll succeed supply
    surprise swim swing teach tease thank tickle travel trust tumble unlock vanish wander wash wave
    weave whisper wiggle wink wish wobble wonder worry wrap yawn yell zoom
    """
)


def _distinct_vocabulary() -> tuple[str, ...]:
    """NOUNS + ADJECTIVES + VERBS without duplicates and without words contained in another word.

    Scoring is substring-based, so e.g. "ant" must not be a word if "elephant" is one.
    """
    words = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))
    return tuple(w for w in words if not any(w != o and w in o for o in words))


VOCABULARY = _distinct_vocabulary()
