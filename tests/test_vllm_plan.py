"""The vLLM connector's vLLM-free parts: the scheduler's plan and the paged-row helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.vllm import CONNECTOR_CONFIG, vllm_serve_command
from kvsqueeze.vllm.paged import BlockLayout, check_layout, probe_layout, read_rows, slots_of, write_rows
from kvsqueeze.vllm.plan import (
    FIND_WINDOW,
    Keep,
    Placement,
    ReuseIndex,
    rows_key,
    shared_spans,
    truncate_loads,
)

HEADER_A = list(range(1000, 1012))  # an agent's own text: 12 tokens
HEADER_B = list(range(2000, 2020))  # another agent's: 20 tokens
DOC = list(range(10, 110))  # a shared document: 100 tokens
QUESTION = list(range(5000, 5010))


def served(index: ReuseIndex, ids: list[int], computed: int = 0, shared=()) -> None:
    """Run a prompt the way vLLM would (nothing loaded) and record what its worker keeps."""
    for keep in index.plan(ids, computed, shared).keeps:
        index.add(keep, ids)


def test_a_prompt_with_a_new_document_is_computed_and_kept():
    index = ReuseIndex()
    ids = HEADER_A + DOC
    plan = index.plan(ids, 0, [(12, 112)])
    assert plan.loads == []
    assert {(k.kind, k.start, k.end) for k in plan.keeps} == {("segment", 12, 112), ("prefix", 0, 12)}


def test_the_same_agent_loads_its_header_and_the_document_and_computes_the_question():
    index = ReuseIndex()
    served(index, HEADER_A + DOC, shared=[(12, 112)])
    ids = HEADER_A + DOC + QUESTION
    plan = index.plan(ids, 0)
    assert plan.loads == [
        Placement("prefix", rows_key("p", HEADER_A), 0, (0, 12)),
        Placement("segment", rows_key("s", DOC), 12, (0, 100)),
    ]
    assert plan.loaded_tokens == 112 and plan.keeps == []


def test_another_agent_is_computed_once_then_gets_the_document_at_its_own_offset():
    index = ReuseIndex()
    served(index, HEADER_A + DOC, shared=[(12, 112)])
    ids = HEADER_B + DOC + QUESTION
    first = index.plan(ids, 0)
    assert first.loads == [] and [(k.kind, k.start, k.end) for k in first.keeps] == [("prefix", 0, 20)]
    for keep in first.keeps:
        index.add(keep, ids)
    second = index.plan(ids, 0)
    assert [(p.kind, p.start, p.rows) for p in second.loads] == [
        ("prefix", 0, (0, 20)),
        ("segment", 20, (0, 100)),
    ]


def test_loads_start_where_vllms_own_prefix_cache_stops_and_leave_the_last_token():
    index = ReuseIndex()
    served(index, HEADER_A + DOC, shared=[(12, 112)])
    plan = index.plan(HEADER_A + DOC + QUESTION, 64)  # vLLM holds one 64-token block already
    assert [(p.kind, p.start, p.rows) for p in plan.loads] == [("segment", 64, (52, 100))]
    prompt_ends_with_doc = index.plan(HEADER_A + DOC, 0)
    assert prompt_ends_with_doc.loaded_tokens == len(HEADER_A + DOC) - 1


def test_adjacent_documents_chain_and_own_text_between_them_stops_the_load():
    index = ReuseIndex()
    doc2 = list(range(300, 340))
    served(index, HEADER_A + DOC + doc2, shared=[(12, 112), (112, 152)])
    chained = index.plan(HEADER_A + DOC + doc2 + QUESTION, 0)
    assert [p.kind for p in chained.loads] == ["prefix", "segment", "segment"]
    gap = index.plan(HEADER_A + DOC + QUESTION + doc2 + QUESTION, 0)
    assert [p.kind for p in gap.loads] == ["prefix", "segment"]  # doc2 follows own text: vLLM computes it


def test_find_takes_the_longest_stored_segment_at_a_position():
    index = ReuseIndex()
    served(index, HEADER_A + DOC, shared=[(12, 112)])
    served(index, HEADER_A + DOC[:50], shared=[(12, 62)])
    assert index.find([7] + DOC + [8]) == [(1, rows_key("s", DOC))]
    assert index.find([7] + DOC[:60]) == [(1, rows_key("s", DOC[:50]))]
    index.discard(rows_key("s", DOC))
    assert index.find([7] + DOC) == [(1, rows_key("s", DOC[:50]))]


def test_kvcomm_measures_an_agents_first_documents_then_blends_their_offsets():
    index = ReuseIndex("kvcomm", min_anchors=2)
    docs = [list(range(100 * i + 10, 100 * i + 110)) for i in range(1, 4)]
    for doc in docs:
        served(index, HEADER_A + doc, shared=[(12, 112)])  # indexed after agent A's text
    agent = rows_key("p", HEADER_B)
    served(index, HEADER_B + docs[0] + QUESTION)  # agent B's first prompt: its header is kept
    for doc in docs[:2]:  # then its first two documents are computed by vLLM and measured
        plan = index.plan(HEADER_B + doc + QUESTION, 0)
        assert plan.loads == [] and [(k.kind, k.base, k.agent) for k in plan.keeps] == [
            ("anchor", rows_key("s", doc), agent)
        ]
        served(index, HEADER_B + doc + QUESTION)
    blended = index.plan(HEADER_B + docs[2] + QUESTION, 0)
    segment = blended.loads[1]
    assert segment.anchors == (rows_key("s", docs[0]), rows_key("s", docs[1])) and segment.agent == agent
    exact = index.plan(HEADER_B + docs[0] + QUESTION, 0)  # a measured document gets its own offset
    assert exact.loads[1].anchors == (rows_key("s", docs[0]),)


def test_kvcomm_anchors_are_capped_oldest_first():
    index = ReuseIndex("kvcomm", min_anchors=1, max_anchors=2)
    for i in range(3):
        index.add(Keep("anchor", f"a{i}", 0, 1, base=f"s{i}", agent="p"), [])
    assert index.anchors["p"] == ["s1", "s2"]
    with pytest.raises(ValueError, match="policy"):
        ReuseIndex("cacheblend")
    with pytest.raises(ValueError, match="min_anchors"):
        ReuseIndex("kvcomm", min_anchors=0)


def test_truncated_loads_keep_the_first_rows():
    loads = [Placement("prefix", "p", 0, (0, 12)), Placement("segment", "s", 12, (0, 100))]
    assert truncate_loads(loads, 20) == [loads[0], Placement("segment", "s", 12, (0, 8))]
    assert truncate_loads(loads, 0) == []


@pytest.mark.parametrize(
    "params, message",
    [
        ({"kvsqueeze": []}, "must be a dict"),
        ({"kvsqueeze": {"share": 3}}, "list of"),
        ({"kvsqueeze": {"share": [[5, 2]]}}, "0 <= start < end"),
        ({"kvsqueeze": {"share": [[0, 500]]}}, "0 <= start < end"),
        ({"kvsqueeze": {"share": [[0, FIND_WINDOW - 1]]}}, "at least"),
    ],
)
def test_malformed_shared_spans_are_one_line_errors(params, message):
    with pytest.raises(ValueError, match=message):
        shared_spans(params, 100)


def test_shared_spans_ignore_other_connectors_params():
    assert shared_spans(None, 10) == [] and shared_spans({"do_remote_prefill": True}, 10) == []
    assert shared_spans({"kvsqueeze": {"share": [[20, 40], [0, 10]]}}, 100) == [(0, 10), (20, 40)]


# ---------------------------------------------------------------------- paged rows


def cpu_layer(num_blocks: int = 6, heads: int = 2, block_size: int = 32, dim: int = 8) -> torch.Tensor:
    return torch.zeros(num_blocks, heads, block_size, 2 * dim)


def channel_major_write(key, value, key_cache, value_cache, slots):
    """A stand-in for the CPU backend's ``vec`` cache write: keys (D, block_size) per block and head, values
    (block_size, D)."""
    num_blocks, heads, block_size, dim = key_cache.shape
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        key_cache[block].view(heads, dim, block_size)[:, :, offset] = key[i]
        value_cache[block, :, offset] = value[i]


def test_the_probed_layout_is_the_one_the_write_op_uses():
    layout = probe_layout(channel_major_write, 32, 8, torch.bfloat16)
    assert layout.keys[3, 5].item() == 5 * 32 + 3  # channel-major keys
    assert torch.equal(layout.values, BlockLayout.token_major(32, 8).values)
    layer = cpu_layer()
    keys, values = torch.randn(4, 2, 8), torch.randn(4, 2, 8)  # (T, H_kv, D), as vLLM hands them over
    slots = slots_of([4, 1], 32, 30, 34)
    key_cache, value_cache = layer.view(6, 2, 64, 8).chunk(2, dim=2)
    channel_major_write(keys, values, key_cache, value_cache, slots)
    got_keys, got_values = read_rows(layer, slots, layout)
    assert torch.equal(got_keys, keys.transpose(0, 1)) and torch.equal(got_values, values.transpose(0, 1))


def test_a_write_op_that_is_not_a_permutation_is_refused():
    def lossy(key, value, key_cache, value_cache, slots):
        key_cache.zero_()

    with pytest.raises(ValueError, match="permutation"):
        probe_layout(lossy, 32, 8, torch.float32)


def test_slots_map_positions_through_the_block_table():
    slots = slots_of([4, 1], 32, 30, 34)  # positions 30..33: block 4 offsets 30, 31; block 1 offsets 0, 1
    assert slots.tolist() == [4 * 32 + 30, 4 * 32 + 31, 32, 33]


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(6))), st.integers(0, 150), st.integers(1, 40), st.booleans())
def test_rows_read_back_as_written(block_ids, start, length, channel_major):
    end = min(start + length, 6 * 32)
    layout = probe_layout(channel_major_write, 32, 8, torch.float32) if channel_major else None
    layout = layout or BlockLayout.token_major(32, 8)
    layer = cpu_layer()
    slots = slots_of(block_ids, 32, min(start, end - 1), end)
    keys, values = torch.randn(2, len(slots), 8), torch.randn(2, len(slots), 8)
    write_rows(layer, slots, keys, values, layout)
    got_keys, got_values = read_rows(layer, slots, layout)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


def test_other_layouts_are_refused_in_one_line():
    with pytest.raises(ValueError, match="CPU backend's layout"):
        check_layout(torch.zeros(2, 6, 32, 2, 8), 32)  # a flash-attention (2, blocks, size, H, D) cache
    with pytest.raises(ValueError, match="more than the request's"):
        slots_of([0], 32, 0, 40)


def test_the_serve_command_carries_the_connector():
    cmd = vllm_serve_command(
        "/venv/bin/python", "/models/q", "127.0.0.1", 8000, "q", ["--tensor-parallel-size", "2"]
    )
    config = cmd[cmd.index("--kv-transfer-config") + 1]
    assert '"kv_connector_module_path": "kvsqueeze.vllm.connector"' in config
    assert CONNECTOR_CONFIG["kv_load_failure_policy"] == "recompute"
    assert cmd[-2:] == ["--tensor-parallel-size", "2"]
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/q"]


def test_serve_with_the_vllm_engine_execs_vllm_with_the_connector(monkeypatch, tmp_path):
    from kvsqueeze.cli.main import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an HF folder, as vLLM loads
    python = tmp_path / "venv" / "bin" / "python"
    calls = []
    monkeypatch.setattr("kvsqueeze.vllm.env.ensure_vllm_env", lambda: python)
    monkeypatch.setattr("os.execv", lambda path, argv: calls.append(argv))
    main(
        [
            "serve",
            "--engine",
            "vllm",
            "--model",
            str(folder),
            "--port",
            "9001",
            "--",
            "--tensor-parallel-size",
            "2",
        ]
    )
    (argv,) = calls
    assert argv[:5] == [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    assert argv[argv.index("--port") + 1] == "9001" and argv[-2:] == ["--tensor-parallel-size", "2"]


def test_serve_with_the_vllm_engine_needs_an_alias_or_an_hf_folder(capsys, tmp_path):
    from kvsqueeze.cli.main import main

    assert main(["serve", "--engine", "vllm", "--model", str(tmp_path)]) == 2  # a folder without config.json
    assert "neither a packaged model alias nor a local HF folder" in capsys.readouterr().err


def test_vllm_flags_without_the_vllm_engine_are_a_one_line_error(capsys):
    from kvsqueeze.cli.main import main

    assert main(["serve", "--model", "tiny:llama", "--", "--tensor-parallel-size", "2"]) == 2
    assert "with --engine vllm" in capsys.readouterr().err


def test_share_request_is_what_the_plan_reads():
    from kvsqueeze.vllm import share_request

    spans = [(2, 2 + FIND_WINDOW), (40, 40 + FIND_WINDOW)]
    assert shared_spans(share_request(*spans)["kv_transfer_params"], 100) == spans
