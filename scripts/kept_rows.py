"""Where a query-agnostic method's rows go: per layer, the rows it keeps and the share of the facts among them.

    .venv/bin/python scripts/kept_rows.py variable_tracking 0 kvzip@0.1 'kvzap:floor=0.25@0.1'

Prefills one sample of the 4k suite (Qwen2.5-Coder-0.5B, seed 0, ``pydocs`` haystack, float32) once and
forks it into each METHOD@KEEP (``name:param=value:...@keep``). A fact token is a token of the text around
one of the sample's answer names (for variable_tracking, its ``VAR X = ...`` statements). For each layer it
prints the rows kept over both KV heads, and the share of fact tokens that some head and that every head
keeps.
"""

from __future__ import annotations

import argparse

import torch

from kvsqueeze import SqueezeCache
from kvsqueeze.bench.prompts import encode_sample
from kvsqueeze.bench.tasks import generate_samples
from kvsqueeze.cli.params import coerce_params, parse_assignment
from kvsqueeze.models import load_model

MODEL, LENGTH = "qwen2.5-coder-0.5b", 4096
AROUND = (6, 12)  # characters before and after an answer name that make up its fact


def fact_tokens(text: str, names: list[str], offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Indices of the tokens overlapping the text around every occurrence of ``names``."""
    spans = []
    for name in names:
        at = text.find(name)
        while at >= 0:
            spans.append((at - AROUND[0], at + len(name) + AROUND[1]))
            at = text.find(name, at + 1)
    return torch.tensor([i for i, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in spans)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task")
    parser.add_argument("index", type=int, help="sample index (seed 0)")
    parser.add_argument("methods", nargs="+", help="name:param=value@keep")
    args = parser.parse_args()
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    sample = generate_samples(args.task, tokenizer, length=LENGTH, num_samples=args.index + 1, seed=0)[
        args.index
    ]
    ids = encode_sample(tokenizer, sample, "query_agnostic").compressed_ids  # (1, T)
    text = tokenizer.decode(ids[0])
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) != ids.shape[1]:
        raise ValueError(f"{args.task} #{args.index}: the decoded prompt does not re-tokenize to its ids")
    names = [n for chain in sample.metadata.get("chains", [sample.answers]) for n in chain]
    facts = fact_tokens(text, names, offsets)
    print(f"{args.task} #{args.index}: {ids.shape[1]} tokens, {len(facts)} fact tokens")
    with torch.inference_mode():
        source = SqueezeCache(model, "full", record_prefill=True, tokenizer=tokenizer)
        model(ids, cache=source, logits_to_keep=1)
        for spec in args.methods:
            method, _, keep = spec.rpartition("@")
            name, *assignments = method.split(":")
            params = coerce_params(name, dict(parse_assignment(a) for a in assignments))
            cache = source.fork(name, float(keep), **params)
            rows, some, every = [], [], []
            for layer in cache.layers:
                kept = torch.zeros(layer.num_kv_heads, ids.shape[1], dtype=torch.bool)  # (H_kv, T)
                for head, positions in enumerate(layer.kept_positions()[0]):
                    kept[head, positions] = True
                rows.append(int(kept.sum()))
                some.append(float(kept[:, facts].any(0).float().mean()))
                every.append(float(kept[:, facts].all(0).float().mean()))
            print(f"{spec}\n  rows kept per layer: {' '.join(map(str, rows))}")
            print(f"  facts kept by some head: {' '.join(f'{x:.2f}' for x in some)}")
            print(f"  facts kept by every head: {' '.join(f'{x:.2f}' for x in every)}")


if __name__ == "__main__":
    main()
