"""Measure KV reuse across agents (issue 21) and write it into docs/RESULTS.md.

    .venv/bin/python scripts/reuse_report.py            # print the table
    .venv/bin/python scripts/reuse_report.py --write    # and replace the reuse block in docs/RESULTS.md

The multi-agent retrieval-QA benchmark of :mod:`kvsqueeze.bench.multiagent`: ``--agents`` agents with
different roles answer over shared generated documents and each other's answers; full recompute, plain
position-corrected reuse, CacheBlend and KVCOMM run the same queries in one run, interleaved query by query.
Prefill times are ratios to full recompute measured in the same run (one torch thread).
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import time
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze.bench.multiagent import ROLES, agent_header, make_queries, run_multiagent
from kvsqueeze.bench.report import replace_block
from kvsqueeze.cli.params import parse_assignment
from kvsqueeze.reuse import ReusePolicy, get_policy

ROOT = Path(__file__).resolve().parent.parent
# what the published runs compare: the papers' policies, and plain reuse and KVCOMM with the tail after the
# document recomputed
POLICIES = (
    "full",
    "plain",
    "plain:recompute_tail=64",
    "cacheblend",
    "kvcomm",
    "kvcomm:recompute_tail=64",
)
# a generic system turn and the opening of a user turn: stored segments are computed in the context they are
# used in (spec B §3.1: "after the same BOS/system prefix, then dropped"); each agent's own system text differs
SYSTEM_HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def table(summary: dict[str, dict]) -> str:
    lines = [
        "| policy | accuracy | agrees with full | reuse rate (prompts) | reused tokens | prefill s | "
        "prefill speedup | with indexing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for policy, s in summary.items():
        lines.append(
            f"| `{policy}` | {100 * s['accuracy']:.1f} | {100 * s['agreement_with_full']:.1f} | "
            f"{100 * s['reuse_rate']:.0f}% | {100 * s['reused_token_share']:.0f}% | {s['prefill_seconds']:.1f} | "
            f"{s['speedup']:.2f}x | {s['speedup_with_indexing']:.2f}x |"
        )
    return "\n".join(lines)


def body_of(args: argparse.Namespace, result: dict, doc_tokens: list[int], out: Path, wall: float) -> str:
    """The RESULTS block of one run."""
    summary = result["summary"]
    prompt_tokens = [r["tokens"] for r in result["records"] if r["policy"] == "full"]
    command = (
        f".venv/bin/python scripts/reuse_report.py --write --model {args.model} --queries {args.queries} "
        f"--agents {args.agents} --doc-words {args.doc_words} --doc-tokens {args.doc_tokens} --seed {args.seed}"
        + ("" if args.header == SYSTEM_HEADER else f" --header {bash_quoted(args.header)}")
        + ("" if args.policies == ",".join(POLICIES) else f" --policies {args.policies}")
        + ("" if out == default_out(args.model) else f" --out {relative(out)}")
    )
    extension = [
        "`plain(recompute_tail=N)` and `kvcomm(recompute_tail=N)` reuse the prompt up to the document (its last "
        "shared segment of at least N tokens; plain by RoPE shift alone, KVCOMM with its offsets) and compute the "
        "question, the earlier answers and the agent's closing text over it: kvsqueeze's extension. `plain` and "
        "`kvcomm` are the papers': they reuse the question and the answers too (KVCOMM computes only the "
        "prompt's last token)."
    ]
    if not any("(recompute_tail=" in policy for policy in summary):
        extension = []
    return "\n".join(
        [
            f"Multi-agent retrieval QA, model `{args.model}` (fp32, {args.threads} torch thread), {args.agents} "
            f"agents with different roles x {args.queries} queries = {len(prompt_tokens)} prompts per policy; "
            f"documents {min(doc_tokens)}-{max(doc_tokens)} tokens (prose cut to a fixed length, as a chunked "
            f"corpus), prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens; agent k reads the document, the "
            f"question and agents 1..k-1's answers. Command: `{command}` (records in `{relative(out)}`).",
            f"Stored segments are computed after the header {json.dumps(args.header)} (then dropped)"
            + (
                ", agent 1's own text before the document: the documents' KV as the first agent to read them "
                "computes it, which later agents reuse after their own roles"
                if args.header == agent_header(ROLES[0])
                else ""
            )
            + "; an agent's answer, as later agents read it, is its first sentence.",
            *extension,
            "",
            table(summary),
            "",
            "Accuracy: the gold access code is the answer's first 4-digit number; agreement: the same code as full "
            "recompute's answer to the same prompt position. Reuse rate: prompts served without a dense prefill "
            "(KVCOMM's definition); reused tokens: share of prompt tokens whose KV came from stored segments. "
            "Prefill: prepare (store look-ups, base KVs of questions and answers, anchor prediction, offsets, "
            "RoPE shifts, recompute) plus the last prompt token's forward, summed over all prompts; speedup = "
            "full recompute's sum / the policy's, same run. The documents' base KVs are computed once beforehand "
            f"(an indexed corpus, {result['index_seconds']:.1f} s for all {args.queries}); 'with indexing' adds "
            "that time to the policy's.",
            "",
            *targets(result["records"], summary),
            "",
            f"Wall time of this report: {wall:.0f} s.",
        ]
    )


def targets(records: list[dict], summary: dict[str, dict]) -> list[str]:
    """Issue 21's targets for each KVCOMM row, and its accuracy split by how each prompt was served."""
    if "full" not in summary:
        return []
    f = summary["full"]
    full = {(r["query"], r["agent"]): r["correct"] for r in records if r["policy"] == "full"}
    lines, verdicts = [], []
    for policy in (p for p in summary if p.startswith("kvcomm")):
        for dense, label in ((False, "reused"), (True, "densely prefilled")):
            rows = [r for r in records if r["policy"] == policy and r["dense"] == dense]
            if rows:
                mine = sum(r["correct"] for r in rows)
                ref = sum(full[(r["query"], r["agent"])] for r in rows)
                lines.append(
                    f"`{policy}`'s {len(rows)} {label} prompts: {mine} answered right, full recompute {ref} "
                    "of the same."
                )
        k = summary[policy]
        gap = 100 * (k["accuracy"] - f["accuracy"])
        checks = [
            f"reuse >= 70%: {100 * k['reuse_rate']:.0f}% ({'met' if k['reuse_rate'] >= 0.7 else 'missed'})",
            f"prefill >= 3x faster: {k['speedup']:.2f}x ({'met' if k['speedup'] >= 3 else 'missed'})",
            f"accuracy within 2 points of full: {gap:+.1f} ({'met' if abs(gap) <= 2 else 'missed'})",
        ]
        verdicts.append(f"Issue 21's targets for `{policy}` at 5 agents: " + "; ".join(checks) + ".")
    per_query: dict[int, float] = {}
    for r in records:
        if r["policy"] == "full":
            per_query[r["query"]] = per_query.get(r["query"], 0.0) + r["prefill_seconds"]
    lines.append(
        f"Full recompute's prefill per query (5 prompts) ranged {min(per_query.values()):.1f}-"
        f"{max(per_query.values()):.1f} s over the run: the 2 cores were shared with other jobs, which the "
        "query-by-query interleaving spreads over all policies but does not remove."
    )
    return [" ".join(lines), "", *verdicts]


def policy_of(text: str) -> ReusePolicy:
    """A policy from ``NAME`` or ``NAME:PARAM=VALUE:...`` (values are Python literals: 64, 0.3)."""
    name, *params = text.split(":")
    values = {key: ast.literal_eval(value) for key, value in map(parse_assignment, params)}
    return get_policy(name, **values)


def published_names(model: str) -> tuple[str, str]:
    """(records file name, RESULTS block) of a model's run: SmolLM2's was the first, under the generic names."""
    return ("multiagent.json", "reuse") if model == "smollm2-135m" else (f"{model}.json", f"reuse_{model}")


def default_out(model: str) -> Path:
    return ROOT / "docs" / "bench" / "reuse" / published_names(model)[0]


def block_of(model: str, out: Path) -> str:
    """The RESULTS block a run writes: its model's, or one named after its records file when --out moved them."""
    return published_names(model)[1] if out == default_out(model) else f"reuse_{out.stem}"


def bash_quoted(text: str) -> str:
    """``text`` as one bash word, newlines included (``$'...'``), to paste into a shell."""
    if "\n" not in text:
        return shlex.quote(text)
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def relative(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--doc-words", type=int, default=800, help="prose drawn per document")
    parser.add_argument("--doc-tokens", type=int, default=900, help="documents cut to this many tokens")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--header",
        default=SYSTEM_HEADER,
        help="what stored segments are computed after, then dropped ('bos': the tokenizer's BOS token)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma list of policies, each NAME or NAME:PARAM=VALUE (kvcomm:recompute_tail=64)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        help="records (default: docs/bench/reuse/multiagent.json for SmolLM2, else <model>.json); a run moved "
        "elsewhere writes its own RESULTS block, named after the file",
    )
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--render", action="store_true", help="rebuild the block from the records in --out (no model run)"
    )
    args = parser.parse_args()
    out = Path(args.out).resolve() if args.out else default_out(args.model)
    if args.render:
        saved = json.loads(out.read_text())
        args = argparse.Namespace(**{**saved["args"], "write": args.write, "out": str(out)})
        doc_tokens = [args.doc_tokens]  # make_queries cuts every document to exactly this many tokens
        body = body_of(args, saved, doc_tokens, out, saved.get("wall_seconds", float("nan")))
    else:
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        model, tokenizer = kvsqueeze.load_model(args.model)
        queries = make_queries(
            args.queries, args.doc_words, seed=args.seed, tokenizer=tokenizer, doc_tokens=args.doc_tokens
        )
        doc_tokens = [len(tokenizer(q.document, add_special_tokens=False)["input_ids"]) for q in queries]
        header = None if args.header == "bos" else args.header
        result = run_multiagent(
            model,
            tokenizer,
            queries,
            policies=[policy_of(text) for text in args.policies.split(",")],
            num_agents=args.agents,
            header=header,
            log=lambda s: print(s, flush=True),
        )
        wall = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        saved_args = {k: v for k, v in vars(args).items() if k not in ("write", "render", "out")}
        out.write_text(json.dumps({"args": saved_args, "wall_seconds": wall, **result}, indent=1))
        body = body_of(args, result, doc_tokens, out, wall)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", block_of(args.model, out), body)  # args as saved


if __name__ == "__main__":
    main()
