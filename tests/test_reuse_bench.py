"""The multi-agent reuse benchmark's plumbing on a tiny model (the published figures use scripts/reuse_report.py)."""

from __future__ import annotations

import kvsqueeze
from kvsqueeze.bench.multiagent import agent_prompt, first_code, make_queries, run_multiagent
from kvsqueeze.models.tiny import tiny_model, tiny_tokenizer


def test_queries_hold_their_facts_and_are_seeded():
    queries = make_queries(3, 120, seed=4)
    assert queries == make_queries(3, 120, seed=4)
    for q in queries:
        assert f"is {q.answer}." in q.document
        project = q.question.removeprefix("What is the access code of project ").removesuffix("?")
        assert f"The access code of project {project} is {q.answer}." in q.document


def test_agent_prompt_shares_document_question_and_answers():
    q = make_queries(1, 60, seed=0)[0]
    segments = agent_prompt("a checker", q, ["A 1234", "B 5678"])
    assert [s.slot for s in segments if s.is_shared] == ["document", "question", "answer1", "answer2"]
    assert first_code("code is 4821.") == "4821" and first_code("none") is None


def test_run_multiagent_on_a_tiny_model():
    model = tiny_model("llama", num_hidden_layers=2)
    kvsqueeze.enable(model)
    tok = tiny_tokenizer()
    queries = make_queries(3, 40, seed=1)
    out = run_multiagent(model, tok, queries, num_agents=3, max_new_tokens=2, log=lambda s: None)
    summary = out["summary"]
    assert set(summary) == {"full", "plain", "cacheblend", "kvcomm"}
    assert all(s["calls"] == 9 for s in summary.values())
    assert summary["full"]["reuse_rate"] == 0 and summary["full"]["agreement_with_full"] == 1
    assert summary["plain"]["reuse_rate"] == 1 and summary["plain"]["reused_token_share"] > 0.5
    assert summary["kvcomm"]["reuse_rate"] < 1  # the first prompts of each agent are dense
