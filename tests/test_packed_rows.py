"""Property tests for the packed ragged storage against a plain list-of-lists model."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.cache import PackedRows

D = 3


def as_lists(rows: PackedRows) -> list[list[list[float]]]:
    """Segments -> rows -> feature values, read through the padded view and the valid mask."""
    padded = rows.padded("keys")
    valid = rows.valid_mask()
    return [
        [padded[s, t].tolist() for t in range(padded.shape[1]) if valid[s, t]]
        for s in range(rows.num_segments)
    ]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans()),
        st.tuples(st.just("keep"), st.integers(0, 3), st.integers(0, 2**31 - 1), st.booleans()),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(num_segments=st.integers(1, 5), operations=ops)
def test_packed_rows_match_a_list_model(num_segments, operations):
    rows = PackedRows(num_segments)
    model: list[list[list[float]]] = [[] for _ in range(num_segments)]
    counter = 0
    for op, n, seed, flag in operations:
        gen = torch.Generator().manual_seed(seed)
        if op == "append":
            q = n
            new = torch.arange(counter, counter + num_segments * q * D, dtype=torch.float32).view(
                num_segments, q, D
            )
            counter += num_segments * q * D
            keep = torch.rand(num_segments, q, generator=gen) < 0.7 if flag else None
            pos = torch.arange(q, dtype=torch.int32).expand(num_segments, q)
            rows.append({"keys": new, "positions": pos}, keep=keep)
            for s in range(num_segments):
                for j in range(q):
                    if keep is None or keep[s, j]:
                        model[s].append(new[s, j].tolist())
        else:
            width = max((len(seg) for seg in model), default=0)
            mask = torch.zeros(num_segments, width, dtype=torch.bool)
            for s, segment in enumerate(model):
                keep_n = min(len(segment), n) if flag else len(segment)
                chosen = sorted(torch.randperm(len(segment), generator=gen)[:keep_n].tolist())
                mask[s, chosen] = True
                model[s] = [segment[i] for i in chosen]
            if rows.fields:
                rows.keep(mask)
        if rows.fields:
            assert as_lists(rows) == model
            assert rows.lengths.tolist() == [len(seg) for seg in model]
            assert rows.num_rows == sum(len(seg) for seg in model)
            assert rows.nbytes() == rows.num_rows * (D * 4 + 4)  # exactly the stored rows, nothing padded
            assert rows.is_uniform == (len({len(seg) for seg in model}) == 1)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5), order_seed=st.integers(0, 1000))
def test_select_segments_reorders_whole_segments(lengths, order_seed):
    rows = PackedRows(len(lengths))
    width = max(lengths) if max(lengths) > 0 else 1
    data = torch.arange(len(lengths) * width * D, dtype=torch.float32).view(len(lengths), width, D)
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    rows.append({"keys": data}, keep=keep)
    before = as_lists(rows)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(order_seed))
    rows.select_segments(order)
    assert as_lists(rows) == [before[i] for i in order.tolist()]


def test_uniform_append_is_a_view_of_dense_storage():
    rows = PackedRows(4)
    rows.append({"keys": torch.randn(4, 5, D)})
    rows.append({"keys": torch.randn(4, 1, D)})
    dense = rows.padded("keys")
    assert dense.shape == (4, 6, D) and dense.data_ptr() == rows.fields["keys"].data_ptr()
