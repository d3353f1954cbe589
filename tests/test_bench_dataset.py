"""`kvsqueeze bench --dataset`: every line runs unless --samples says otherwise, grouped by task; the
progress bar counts (method, budget) runs. A tiny random model with SmolLM2's tokenizer keeps it cheap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench import Sample
from kvsqueeze.bench.datasets import group_by_task, load_jsonl_dataset
from kvsqueeze.bench.runner import BenchConfig, MethodSpec, run_bench
from kvsqueeze.cli import commands
from kvsqueeze.cli.main import main
from kvsqueeze.models.tiny import tiny_model

# Seven lines (more than the 5 generated samples a bench runs by default) over three tasks.
TASKS = ["capitals"] * 4 + ["numbers"] * 2 + [None]


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2):
    _, tokenizer = smollm2
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=len(tokenizer), seed=0)
    return model, tokenizer


@pytest.fixture
def tiny_load(model_and_tokenizer, monkeypatch):
    """The CLI loads the tiny model instead of a packaged one."""
    monkeypatch.setattr(commands, "_load", lambda args: model_and_tokenizer)


def write_dataset(path: Path, tasks: list[str | None]) -> Path:
    """One JSONL line per entry of ``tasks`` (None: the line has no task field)."""
    lines = []
    for i, task in enumerate(tasks):
        record = {"context": f"The code word of line {i} is w{i}. " * 6, "question": "Code word?"}
        record["answers"] = [f"w{i}"]
        if task is not None:
            record["task"] = task
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def bench(dataset: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "bench",
            "--dataset",
            str(dataset),
            "--methods",
            "snapkv:window=4",
            "--budgets",
            "0.5",
            "--max-new-tokens",
            "3",
            "--fidelity-tokens",
            "3",
            "--out",
            str(out),
            *extra,
        ]
    )


def full_records(out: Path) -> dict[str, dict]:
    """The ``full`` record of each task, by task."""
    paths = (out / "runs" / "query_agnostic").glob("*/0/full@1.json")
    return {path.parts[-3]: json.loads(path.read_text()) for path in paths}


def test_dataset_runs_every_line_per_task(tiny_load, tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data.jsonl", TASKS)
    assert bench(dataset, tmp_path / "out") == 0
    records = full_records(tmp_path / "out")
    assert {task: r["num_samples"] for task, r in records.items()} == {
        "capitals": 4,
        "numbers": 2,
        "jsonl": 1,  # the loader's default task
    }
    assert [s["sample_id"] for s in records["capitals"]["samples"]] == [f"capitals-0-{i}" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "out/runs/query_agnostic/numbers/0").iterdir()) == [
        "full@1.json",
        "snapkv(window=4)@0.5.json",
    ]
    captured = capsys.readouterr()
    assert "7 samples in 3 task(s): capitals (4), numbers (2), jsonl (1)" in captured.err
    header = next(line for line in captured.out.splitlines() if line.startswith("| source"))
    assert "capitals" in header and "numbers" in header and "jsonl" in header
    # no generated length: the prompts' own token counts give the context and the prefill rate
    capitals = records["capitals"]
    assert capitals["prompt_tokens"] == sum(s["prompt_tokens"] for s in capitals["samples"]) / 4 > 0
    assert capitals["prefill_tokens_per_second"] > 0
    assert "context a dataset's prompts (mean " in captured.out


def test_samples_limits_each_task(tiny_load, tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data.jsonl", TASKS)
    assert bench(dataset, tmp_path / "out", "--samples", "3") == 0
    records = full_records(tmp_path / "out")
    assert {task: r["num_samples"] for task, r in records.items()} == {
        "capitals": 3,
        "numbers": 2,
        "jsonl": 1,
    }
    assert "6 samples (--samples 3 per task, of 7) in 3 task(s)" in capsys.readouterr().err
    one_task = write_dataset(tmp_path / "one.jsonl", ["qa"] * 4)
    assert bench(one_task, tmp_path / "one", "--samples", "2") == 0
    assert full_records(tmp_path / "one")["qa"]["num_samples"] == 2


def test_samples_default_and_bounds(tiny_load, tmp_path, monkeypatch, capsys):
    """No --samples: 5 generated samples per task; --samples below 1 is a one-line error."""
    import kvsqueeze.bench.runner as runner

    seen: list[BenchConfig] = []
    monkeypatch.setattr(runner, "run_bench", lambda model, tok, config, out, **kw: seen.append(config) or [])
    assert main(["bench", "--tasks", "kv_retrieval", "--out", str(tmp_path)]) == 0
    assert main(["bench", "--tasks", "kv_retrieval", "--samples", "2", "--out", str(tmp_path)]) == 0
    assert [c.num_samples for c in seen] == [5, 2]
    capsys.readouterr()
    assert main(["bench", "--tasks", "kv_retrieval", "--samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == "kvsqueeze: error: --samples must be at least 1, got 0"


def test_group_by_task_keeps_file_order(tmp_path):
    samples = [Sample(task, "ctx", "q?", ["a"]) for task in ["b", "a", "b", "c", "b"]]
    groups = group_by_task(samples)
    assert list(groups) == ["b", "a", "c"] and [len(g) for g in groups.values()] == [3, 1, 1]
    assert groups["b"] == [samples[0], samples[2], samples[4]]
    assert [len(g) for g in group_by_task(samples, limit=2).values()] == [2, 1, 1]
    with pytest.raises(ValueError, match="at least 1"):
        group_by_task(samples, limit=0)


def test_task_names_must_work_as_folders(tmp_path):
    path = tmp_path / "data.jsonl"
    write_dataset(path, ["ok", "../escape", "a/b", ".."])
    samples, errors = load_jsonl_dataset(path)
    assert [s.task for s in samples] == ["ok"]
    assert len(errors) == 3 and all("folder name" in e and "\n" not in e for e in errors)


class RecordingBar:
    """Stands in for tqdm: records the total it starts with and every update."""

    instances: list[RecordingBar] = []

    def __init__(self, total: int, initial: int = 0, **kwargs) -> None:
        self.total, self.n, self.updates = total, initial, []
        RecordingBar.instances.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_progress_counts_method_runs_within_samples(model_and_tokenizer, tmp_path, monkeypatch):
    import tqdm.auto

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    groups = {
        "capitals": [Sample("capitals", f"The word is w{i}. " * 5, "Word?", [f"w{i}"]) for i in range(3)],
        "numbers": [Sample("numbers", "The number is 7. " * 5, "Number?", ["7"])],
    }
    cfg = BenchConfig(
        methods=[MethodSpec("snapkv", {"window": 4}), MethodSpec("h2o")],
        budgets=[0.5],
        tasks=list(groups),
        lengths=[0],
        num_samples=3,
        max_new_tokens=3,
        fidelity_tokens=3,
    )
    samples_for = lambda task, length: groups[task]  # noqa: E731
    run_bench(model, tokenizer, cfg, tmp_path, samples_for=samples_for)
    bar = RecordingBar.instances[-1]
    runs = 3  # full, snapkv@0.5, h2o@0.5
    assert bar.total == bar.n == (3 + 1) * runs  # known from the start: the tasks differ in size
    assert bar.updates == [1] * 12  # one tick after each (method, budget) run of a sample
    cfg.methods.append(MethodSpec("knorm"))  # resumed
    run_bench(model, tokenizer, cfg, tmp_path, samples_for=samples_for)
    bar = RecordingBar.instances[-1]
    assert bar.total == bar.n == (3 + 1) * (runs + 1)
    assert bar.updates == [1] * 4  # recorded runs count from the start; the new one ticks per sample
