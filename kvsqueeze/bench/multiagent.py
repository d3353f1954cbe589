"""An offline multi-agent benchmark for KV reuse: agents with different roles answer over shared documents
and each other's answers (KVCOMM's retrieval-QA setting, Ye et al. 2025, §5).

Each query has a generated document (natural prose from the ``pydocs`` haystack with a few facts "The
access code of project Heron is 4821." hidden in it) and a question about one fact. ``num_agents`` agents
answer in turn; agent ``k``'s prompt is its own role header, the document, the question and the answers of
agents ``1..k-1``, then its own closing instruction. The document, the question and the answers are shared
segments (placeholders: ``document``, ``question``, ``answer1`` ...); the rest is the agent's own text.
Documents are indexed offline (their base KV stored once, timed apart), as a retrieval corpus would be.

Every policy runs the same queries as its own conversation (its agents read its own earlier answers), and
the policies are interleaved query by query, so a loaded machine slows them alike. Reported per policy:
accuracy (the gold code is the first 4-digit number of the answer), agreement with full recompute's
answers, reuse rate (prompts served without a dense prefill, KVCOMM's definition) and reused-token share,
and prefill time (prepare plus the last prompt token's forward) as a ratio to full recompute in the run.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.bench.haystack import NOUNS, Haystack
from kvsqueeze.generation import generate
from kvsqueeze.reuse import KVReuse, ReusePolicy, Segment, SegmentStore

ROLES = (
    "a retrieval assistant who finds facts in documents",
    "a meticulous fact checker",
    "a security officer who manages access codes",
    "a project manager reviewing project records",
    "an auditor who double-checks every number",
    "a librarian who knows where every detail is written",
    "a careful analyst who reads documents closely",
    "a technical writer who quotes sources exactly",
)


@dataclass(frozen=True)
class Query:
    document: str
    question: str
    answer: str


def make_queries(
    num_queries: int,
    doc_words: int,
    facts: int = 4,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    doc_tokens: int | None = None,
) -> list[Query]:
    """``num_queries`` documents of about ``doc_words`` words of prose, each with ``facts`` access codes of
    distinct projects at random sentence boundaries (in the first 80% of the text), and a question about
    one of them. With ``tokenizer``, project names are words the tokenizer holds as one token. With
    ``tokenizer`` and ``doc_tokens``, each document is cut to exactly ``doc_tokens`` tokens, as a retrieval
    corpus is chunked (a draw whose cut text does not re-tokenize to that length is drawn again)."""
    rng = random.Random(seed)
    haystack = Haystack.load("pydocs", 200_000)
    names = sorted({n.capitalize() for n in NOUNS})
    if tokenizer is not None:  # one-token names: questions and answers of near-constant length
        names = [n for n in names if len(tokenizer(f" {n}", add_special_tokens=False)["input_ids"]) == 1]
    queries: list[Query] = []
    while len(queries) < num_queries:
        start = rng.randrange(len(haystack.sentences) - 2 * doc_words // 5)
        sentences, words = [], 0
        for sentence in haystack.sentences[start:]:
            if words >= doc_words:
                break
            sentences.append(sentence)
            words += len(sentence.split())
        projects = rng.sample(names, facts)
        codes = [str(rng.randrange(1000, 10000)) for _ in projects]
        for project, code in zip(projects, codes, strict=True):
            at = rng.randrange(1, max(2, int(0.8 * len(sentences))))
            sentences.insert(at, f"The access code of project {project} is {code}.")
        document = " ".join(sentences)
        if tokenizer is not None and doc_tokens is not None:
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
            if len(ids) < doc_tokens:
                raise ValueError(f"documents of {doc_words} words are shorter than {doc_tokens} tokens")
            document = tokenizer.decode(ids[:doc_tokens])
            if len(tokenizer(document, add_special_tokens=False)["input_ids"]) != doc_tokens:
                continue
            if not all(f"project {p} is {c}." in document for p, c in zip(projects, codes, strict=True)):
                continue
        target = rng.randrange(facts)
        queries.append(
            Query(document, f"What is the access code of project {projects[target]}?", codes[target])
        )
    return queries


def agent_header(role: str) -> str:
    """An agent's own text before the document: its system turn and the opening of its user turn."""
    return f"<|im_start|>system\nYou are {role}.<|im_end|>\n<|im_start|>user\nDocument:\n"


def agent_prompt(role: str, query: Query, answers: list[str]) -> list[Segment]:
    """Agent segments: own header, shared document and question, shared earlier answers, own closing."""
    segments = [
        Segment(agent_header(role)),
        Segment(query.document, shared=True, slot="document"),
        Segment("\n\nQuestion: "),
        Segment(query.question, shared=True, slot="question"),
    ]
    for j, answer in enumerate(answers):
        segments += [
            Segment(f"\nAgent {j + 1} answered: "),
            Segment(answer, shared=True, slot=f"answer{j + 1}"),
        ]
    segments.append(Segment("\nReply with the access code only.<|im_end|>\n<|im_start|>assistant\n"))
    return segments


def first_sentence(text: str) -> str:
    """The answer as later agents read it: its first line, up to the end of its first sentence."""
    line = text.strip().split("\n")[0].strip()
    return re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0] or "(empty)"


def first_code(text: str) -> str | None:
    match = re.search(r"\d{4}", text)
    return match.group(0) if match else None


def run_multiagent(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: list[Query],
    *,
    policies: Sequence[str | ReusePolicy] = ("full", "plain", "cacheblend", "kvcomm"),
    num_agents: int = 5,
    max_new_tokens: int = 16,
    header: str | None = None,
    log=print,
) -> dict:
    """Run every policy (a name, or a fresh :class:`ReusePolicy` reported by its ``name``) over ``queries``
    with ``num_agents`` agents; returns per-call records and, per policy, the summary figures (see the module
    doc). ``header``: what stored segments are computed after (``KVReuse``'s; default its BOS token). An
    agent's answer, as later agents read it, is its first line up to the end of its first sentence."""
    if num_agents > len(ROLES):
        raise ValueError(f"at most {len(ROLES)} agents (one role each), got {num_agents}")
    indexed = SegmentStore(2**34)
    index_start = time.perf_counter()
    indexer = KVReuse(model, tokenizer, "plain", store=indexed, header=header)
    for query in queries:
        indexer.add(query.document)
    index_seconds = time.perf_counter() - index_start
    reusers = {}
    for p in policies:
        reuse = KVReuse(model, tokenizer, p, store=indexed.copy(), header=header)
        reusers[reuse.policy.name] = reuse
    records: list[dict] = []
    for qi, query in enumerate(queries):
        for policy, reuse in reusers.items():
            answers: list[str] = []
            for k in range(num_agents):
                prepared = reuse.prepare(agent_prompt(ROLES[k], query, answers))
                result = generate(model, tokenizer, prepared, max_new_tokens=max_new_tokens)
                text = first_sentence(result.text)
                answers.append(text)
                records.append(
                    {
                        "query": qi,
                        "agent": k,
                        "policy": policy,
                        "tokens": prepared.num_tokens,
                        "reused": prepared.reused_tokens,
                        "recomputed": prepared.recomputed_tokens,
                        "dense": prepared.dense,
                        "prefill_seconds": result.prefill_seconds,
                        "answer": text,
                        "correct": first_code(text) == query.answer,
                    }
                )
            mine = [r for r in records if r["query"] == qi and r["policy"] == policy]
            log(
                f"query {qi} {policy}: prefill {sum(r['prefill_seconds'] for r in mine):.2f} s, "
                f"dense {sum(r['dense'] for r in mine)}/{len(mine)}, answers {answers} (gold {query.answer})"
            )
    return {"records": records, "index_seconds": index_seconds, "summary": summarize(records, index_seconds)}


def summarize(records: list[dict], index_seconds: float) -> dict[str, dict]:
    """Per policy: accuracy, agreement with full, reuse rate, reused-token share, prefill time ratios."""
    by_policy: dict[str, list[dict]] = {}
    for r in records:
        by_policy.setdefault(r["policy"], []).append(r)
    full = {(r["query"], r["agent"]): r for r in by_policy.get("full", [])}
    full_seconds = sum(r["prefill_seconds"] for r in full.values())
    out = {}
    for policy, rows in by_policy.items():
        seconds = sum(r["prefill_seconds"] for r in rows)
        agree = [
            first_code(r["answer"]) == first_code(full[(r["query"], r["agent"])]["answer"]) for r in rows
        ]
        out[policy] = {
            "calls": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "agreement_with_full": sum(agree) / len(agree) if full else float("nan"),
            "reuse_rate": sum(not r["dense"] for r in rows) / len(rows),
            "reused_token_share": sum(r["reused"] for r in rows) / sum(r["tokens"] for r in rows),
            "prefill_seconds": seconds,
            "speedup": full_seconds / seconds if seconds else float("nan"),
            "speedup_with_indexing": full_seconds / (seconds + index_seconds) if policy != "full" else 1.0,
        }
    return out
