"""Long-context benchmark tasks (RULER-style), haystacks, scoring and dataset loading."""

from kvsqueeze.bench.datasets import load_jsonl_dataset
from kvsqueeze.bench.haystack import HAYSTACK_KINDS, get_haystack_text
from kvsqueeze.bench.scoring import postprocess, score_sample, string_match_all, string_match_part
from kvsqueeze.bench.tasks import TASKS, Sample, generate_samples, get_task, sample_num_tokens

__all__ = [
    "HAYSTACK_KINDS",
    "TASKS",
    "Sample",
    "generate_samples",
    "get_haystack_text",
    "get_task",
    "load_jsonl_dataset",
    "postprocess",
    "sample_num_tokens",
    "score_sample",
    "string_match_all",
    "string_match_part",
]
