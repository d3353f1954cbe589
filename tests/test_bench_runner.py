"""A tiny end-to-end benchmark: tiny random model, real tokenizer, every output written, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from kvsqueeze.bench import Sample
from kvsqueeze.bench.prompts import encode_sample
from kvsqueeze.bench.report import (
    OLD_PEAK_MARK,
    markdown_table,
    paired_table,
    plot_results,
    ratio_summary,
    replace_block,
    split_labels,
)
from kvsqueeze.bench.runner import (
    BenchConfig,
    MethodSpec,
    continuation_logprobs,
    fidelity,
    load_records,
    run_bench,
)
from kvsqueeze.cache import SqueezeCache
from kvsqueeze.models.tiny import tiny_model


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2):
    _, tokenizer = smollm2
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=len(tokenizer), seed=0)
    return model, tokenizer


def config(**overrides) -> BenchConfig:
    fields = dict(
        methods=[MethodSpec("snapkv", {"window": 8}), MethodSpec("h2o")],
        budgets=[0.25, 0.5],
        tasks=["niah_single_number", "kv_retrieval"],
        lengths=[300],
        num_samples=2,
        settings=["query_agnostic", "query_aware"],
        max_new_tokens=6,
        fidelity_tokens=8,
    )
    fields.update(overrides)
    return BenchConfig(**fields)


def test_end_to_end_writes_json_table_and_plots(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    records = run_bench(model, tokenizer, config(), tmp_path, model_name="tiny", progress=False)
    # 2 settings x 2 tasks x 1 length x (full + 2 methods x 2 budgets)
    assert len(records) == 2 * 2 * 5
    files = list((tmp_path / "runs").rglob("*.json"))
    assert len(files) == 20
    record = json.loads(files[0].read_text())
    assert {"score", "kl", "top1", "cache_bytes", "decode_tokens_per_second", "compression_overhead"} <= set(
        record
    )
    full = [r for r in records if r["method"] == "full"]
    assert all(r["kl"] < 1e-4 and r["top1"] == 1.0 for r in full)
    squeezed = [r for r in records if r["method"] != "full"]
    assert all(r["cache_bytes"] < r["full_cache_bytes"] for r in squeezed)
    table = markdown_table(records, "query_agnostic")
    assert "snapkv(window=8)" in table and "h2o" in table
    plots = plot_results(records, tmp_path / "plots")
    assert len(plots) == 6 and all(p.stat().st_size > 0 for p in plots)


def test_deterministic_and_resumable(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cfg = config(settings=["query_agnostic"], tasks=["niah_single_number"], budgets=[0.25])
    first = run_bench(model, tokenizer, cfg, tmp_path / "a", progress=False)
    second = run_bench(model, tokenizer, cfg, tmp_path / "b", progress=False)
    strip = lambda rs: sorted((r["method"], r["budget"], r["score"], r["kl"], r["cache_bytes"]) for r in rs)  # noqa: E731
    assert strip(first) == strip(second)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.json")}
    again = run_bench(model, tokenizer, cfg, tmp_path / "a", progress=False)  # resumes: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.json")} == before
    assert strip(again) == strip(first)
    grown = config(settings=["query_agnostic"], tasks=["niah_single_number"], budgets=[0.25])
    grown.methods.append(MethodSpec("knorm"))  # a new method: only its record is written
    grown.methods.append(MethodSpec("random", budgets=(0.1,)))  # at its own budget, not the config's
    run_bench(model, tokenizer, grown, tmp_path / "a", progress=False)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.json")}
    assert {p: t for p, t in after.items() if p in before} == before
    assert sorted(p.name for p in set(after) - set(before)) == ["knorm@0.25.json", "random@0.1.json"]


def test_runs_copy_their_rows_not_the_model(model_and_tokenizer, tmp_path, monkeypatch):
    """A run answers from a copy of its compressed cache that shares the model: a deep copy of the model
    (as before 2026-12-08) put one more model's weights into every run's peak memory."""
    model, tokenizer = model_and_tokenizer

    def refuse(memo):
        raise AssertionError("the bench deep-copied the model")

    monkeypatch.setattr(model, "__deepcopy__", refuse, raising=False)
    cfg = config(settings=["query_agnostic"], tasks=["niah_single_number"], budgets=[0.25], num_samples=1)
    records = run_bench(model, tokenizer, cfg, tmp_path, progress=False)
    assert records and all(r["peak_rss_own"] for r in records)
    table = markdown_table(records, "query_agnostic")
    assert f" {OLD_PEAK_MARK} |" not in table  # the mark is for peaks measured with the copies
    old = [{**r, "peak_rss_own": False} for r in records]
    assert f"{OLD_PEAK_MARK} |" in markdown_table(old, "query_agnostic")


def test_ratio_summary_names_the_best_press_per_ratio():
    def record(method, budget, task, score, source="kvsqueeze", setting="query_aware", kept=None):
        full = 1000
        return dict(
            source=source,
            setting=setting,
            method=method,
            budget=budget,
            task=task,
            score=score,
            cache_bytes=full * (kept if kept is not None else budget),
            full_cache_bytes=full,
        )

    records = [
        *(record("full", 1.0, t, 1.0) for t in ("a", "b")),
        record("snapkv", 0.25, "a", 1.0),
        record("snapkv", 0.25, "b", 0.5),
        record("snapkv", 0.1, "a", 0.0),  # one of two tasks
        record("kvzip", 0.25, "a", 0.8, "kvpress", "query_agnostic", kept=1.0),
        record("knorm", 0.25, "a", 0.2, "kvpress", "query_agnostic"),
        record("knorm", 0.1, "a", 0.3, "kvpress", "query_agnostic"),
    ]
    table = ratio_summary(records, "query_aware", ["snapkv", "cake"], [0.1, 0.25], "query_agnostic")
    lines = table.splitlines()
    assert lines[2] == "| full cache | 100 (1.00) | 100 (1.00) |"
    press = "| kvpress's best press (query_agnostic) | knorm: 30 (0.10) (1 of 2 tasks) | kvzip: 80 (1.00) (1 of 2 tasks) |"
    assert lines[3] == press
    assert lines[4] == "| snapkv | 0 (0.10) (1 of 2 tasks) | 75 (0.25) |"
    assert lines[5] == "| cake | not run | not run |"


def test_replace_block_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n")
    replace_block(path, "bench", "first")
    replace_block(path, "other", "x")
    replace_block(path, "bench", "second\ntable")
    text = path.read_text()
    assert text.startswith("# Results\n\nintro\n")
    assert "<!-- bench:start -->\nsecond\ntable\n<!-- bench:end -->" in text and "first" not in text
    assert text.index("bench:end") < text.index("other:start")


def test_plain_full_run_equals_the_full_method(model_and_tokenizer):
    """Sanity: a stock DynamicCache greedy answer equals the bench's `full` prediction path."""
    from transformers import DynamicCache

    from kvsqueeze import SqueezeCache
    from kvsqueeze.bench.runner import greedy

    model, tokenizer = model_and_tokenizer
    sample = Sample("t", "alpha beta gamma " * 40, "What comes after beta?", ["gamma"])
    enc = encode_sample(tokenizer, sample)
    ids = torch.cat([enc.compressed_ids, enc.followup_ids], dim=1)
    with torch.inference_mode():
        stock = model.generate(
            ids, max_new_tokens=5, do_sample=False, cache=DynamicCache(config=model.config)
        )
        source = SqueezeCache(model, "full", record_prefill=True)
        model(enc.compressed_ids, cache=source)
        ours, _ = greedy(model, source.fork("full"), enc.followup_ids, 5, set())
    assert stock[0, ids.shape[1] :].tolist() == ours


def test_fidelity_of_identical_distributions():
    logp = torch.log_softmax(torch.randn(5, 11), -1)
    assert fidelity(logp, logp) == (0.0, 1.0)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"tasks": ["nope"]}, "unknown task"),
        ({"methods": [MethodSpec("nope")]}, "unknown method"),
        ({"budgets": [1.5]}, "budget"),
        ({"methods": [MethodSpec("h2o", budgets=(0.0,))]}, "budget"),
        ({"settings": ["sideways"]}, "setting"),
    ],
)
def test_bad_config(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        config(**overrides).validate(4096)


@pytest.mark.parametrize("max_new_tokens", [6, None])
def test_length_beyond_the_model(max_new_tokens):
    with pytest.raises(ValueError, match="exceeds"):
        config(lengths=[5000], max_new_tokens=max_new_tokens).validate(4096)
    config(lengths=[3000], max_new_tokens=max_new_tokens).validate(4096)


def test_query_settings_split_where_the_question_starts(smollm2):
    _, tokenizer = smollm2
    sample = Sample("t", "The key is 42. " * 20, "What is the key?", ["42"], answer_prefix="The key is")
    agnostic = encode_sample(tokenizer, sample, "query_agnostic")
    aware = encode_sample(tokenizer, sample, "query_aware")
    assert "What is the key?" in tokenizer.decode(agnostic.followup_ids[0])
    assert "What is the key?" in tokenizer.decode(aware.compressed_ids[0])
    assert tokenizer.decode(aware.followup_ids[0]).rstrip().endswith("The key is")


def test_kvpress_rows_read_the_teacher_from_the_full_run_record(tmp_path):
    """kvpress's fidelity uses the full cache's continuation, found where the benchmark wrote it."""
    from kvsqueeze.bench.baseline import _teacher_ids
    from kvsqueeze.bench.runner import run_path

    path = run_path(tmp_path, "query_agnostic", "niah_single_word", 4096, "full", 1.0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": [{"sample_id": "s0", "teacher_ids": [5, 6]}]}))
    assert _teacher_ids(tmp_path, "query_agnostic", "niah_single_word", 4096) == {"s0": [5, 6]}
    assert _teacher_ids(tmp_path, "query_aware", "niah_single_word", 4096) == {}


def test_paired_table_compares_rows_on_the_samples_both_ran():
    def record(method: str, task: str, scores: list[float]) -> dict:
        samples = [{"sample_id": f"{task}-{i}", "score": v, "kl": 0.5} for i, v in enumerate(scores)]
        return {"method": method, "task": task, "samples": samples}

    records = [
        record("full", "a", [1.0, 1.0, 0.0]),
        record("full", "b", [1.0, 0.5]),
        record("quant", "a", [1.0, 0.0, 1.0]),  # -100 and +100 points
        record("quant", "b", [0.5]),  # -50; its second sample never ran
    ]
    lines = paired_table(records).splitlines()
    assert lines[0].startswith("| row | samples | score − full (points) | standard error |")
    # differences 0, -100, +100, -50: mean -12.5, sample standard deviation 85.4, over sqrt(4)
    assert lines[2] == "| `quant` | 4 | -12.5 | 42.7 | 2 | 1 | 0.500 |"
    assert paired_table(records[2:]) == "_no full records to pair with_"
    # another source's row (kvpress) keeps its own name, so it neither merges with ours nor replaces it
    theirs = {**record("quant", "a", [0.0, 0.0, 0.0]), "source": "kvpress", "budget": 0.25}
    lines = paired_table([*records, theirs]).splitlines()
    assert lines[2] == "| `kvpress quant @ 0.25` | 3 | -66.7 | 33.3 | 2 | 0 | 0.500 |"
    assert lines[3] == "| `quant` | 4 | -12.5 | 42.7 | 2 | 1 | 0.500 |"


def test_more_samples_compute_only_the_new_ones(model_and_tokenizer, tmp_path):
    """A run asked for more samples than its records hold adds only those; fewer reads the first ones."""
    model, tokenizer = model_and_tokenizer
    small = config(settings=["query_agnostic"], tasks=["niah_single_number"], budgets=[0.25], num_samples=1)
    large = config(settings=["query_agnostic"], tasks=["niah_single_number"], budgets=[0.25], num_samples=3)
    run_bench(model, tokenizer, small, tmp_path / "grown", progress=False)
    first = {p.name: json.loads(p.read_text()) for p in (tmp_path / "grown").rglob("*.json")}
    grown = run_bench(model, tokenizer, large, tmp_path / "grown", progress=False)
    scratch = run_bench(model, tokenizer, large, tmp_path / "scratch", progress=False)
    key = lambda rs: sorted((r["method"], r["num_samples"], r["score"], r["kl"]) for r in rs)  # noqa: E731
    assert key(grown) == key(scratch) and all(r["num_samples"] == 3 for r in grown)
    for record in grown:  # the first sample is the one recorded before, untouched
        before = first[f"{record['method']}@{record['budget']:g}.json"]["samples"][0]
        assert record["samples"][0] == before
    cut = load_records(small, tmp_path / "grown")  # a smaller config reads its own first samples
    assert key(cut) == key(first.values())


def test_headline_average_leaves_out_tasks_the_full_cache_fails():
    from kvsqueeze.bench.report import calibrated_tasks

    def record(method: str, task: str, score: float) -> dict:
        sample = {"sample_id": f"{task}-0", "score": score, "kl": 0.0}
        return dict(
            setting="query_agnostic", method=method, budget=1.0 if method == "full" else 0.5, task=task,
            length=300, score=score, kl=0.0, top1=1.0, cache_bytes=1, full_cache_bytes=2,
            decode_tokens_per_second=1.0, compression_overhead=0.0, samples=[sample],
        )  # fmt: skip

    records = [record("full", "easy", 1.0), record("full", "hard", 0.5)]
    records += [record("snapkv", "easy", 0.8), record("snapkv", "hard", 0.0)]
    assert calibrated_tasks(records) == ["easy"]
    table = markdown_table(records, "query_agnostic")
    assert "left out: hard" in table
    snapkv = next(line for line in table.splitlines() if "| snapkv |" in line).split(" | ")
    assert snapkv[5:7] == ["40", "80"]  # every task, then the tasks the full cache passes


def test_full_cache_size_is_the_full_rows_own():
    """kvpress's rows may run in another dtype: the "Full cache" line reads the full row's records only."""

    def record(source: str, method: str, full_bytes: int) -> dict:
        sample = {"sample_id": "t-0", "score": 1.0, "kl": 0.0}
        return dict(
            source=source, setting="query_aware", method=method, budget=1.0 if method == "full" else 0.25,
            task="t", length=300, score=1.0, kl=0.0, top1=1.0, cache_bytes=1, full_cache_bytes=full_bytes,
            decode_tokens_per_second=1.0, compression_overhead=0.0, samples=[sample],
        )  # fmt: skip

    records = [record("kvsqueeze", "full", 2 * 2**20), record("kvpress", "kvzip", 4 * 2**20)]
    assert "Full cache: 2.0 MiB on average per sample." in markdown_table(records, "query_aware")


def test_two_profiles_of_one_method_are_two_rows(tmp_path):
    from kvsqueeze.methods.profiled import LayerProfile

    paths = [LayerProfile(keep_ratios=r).save(tmp_path / f"{n}.json") for n, r in (("a", [0.5]), ("b", [1]))]
    labels = {MethodSpec("snapkv", profile=str(p)).label for p in paths}
    assert labels == {"snapkv+a", "snapkv+b"}  # their run records do not overwrite each other
    assert MethodSpec("snapkv").label == "snapkv"


def test_continuation_logprobs_stepwise_equals_one_call_on_the_full_cache():
    """Teacher forcing token by token after a chunk (H2O's way) reads what one call reads when nothing is evicted."""
    model = tiny_model("llama", seed=0)
    prompt, ids = torch.randint(3, 200, (1, 12)), torch.randint(3, 200, (1, 9))
    logprobs = []
    for stepwise in (False, True):
        cache = SqueezeCache(model, "full")
        with torch.inference_mode():
            model(prompt, cache=cache)
            logprobs.append(continuation_logprobs(model, cache, ids, stepwise, chunk=4))
    assert logprobs[0].shape == (9, model.config.vocab_size)
    torch.testing.assert_close(logprobs[0], logprobs[1], atol=1e-4, rtol=1e-4)


def test_split_labels_keeps_the_commas_inside_a_label():
    """``--methods`` of the report scripts: a label's own parameters are not split apart."""
    text = "kvzip(keep_header=True,window=16),kvzap,quest(bounds_dtype=float32,page_size=4)"
    assert split_labels(text) == [
        "kvzip(keep_header=True,window=16)",
        "kvzap",
        "quest(bounds_dtype=float32,page_size=4)",
    ]
    assert split_labels("snapkv") == ["snapkv"]
