"""Decode-step attention time of query-aware selection (Quest, MPCache) against the full cache, as a ratio
measured in one run, and its block in docs/RESULTS.md.

    .venv/bin/python scripts/selection_speed.py                 # print the table
    .venv/bin/python scripts/selection_speed.py --write         # ... and publish it (block selection_speed)

One attention layer with a model's shapes (default Qwen2.5-Coder-0.5B: 14 query heads, 2 KV heads, head
dim 64) holds ``--context`` random fp32 rows, as a layer holds a prompt's rows
after a dense prefill. Each decode step then appends one row and runs the layer's attention call
(:meth:`SqueezeLayer.attend`, the code path the model's attention function takes): for the full cache
SDPA over every row, for a selecting layer the page scores, the top-k, the gather of the chosen rows and
SDPA over them. The full layer and the selecting layers are stepped in turn, step after step, so a
loaded machine slows all of them alike; the table gives the median time per step and its ratio to the
full layer's. The append (``update``), the same for every layer, is timed apart. Random keys make the page
scores random, not the time: selection costs the same whatever it picks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kvsqueeze.bench.report import replace_block
from kvsqueeze.bench.runner import MethodSpec
from kvsqueeze.cache import Budget, SqueezeLayer
from kvsqueeze.methods import get_method

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ".venv/bin/python scripts/selection_speed.py --write"
DEFAULT_METHODS = (
    "quest",
    "quest:bounds_dtype=float32",
    "quest:page_size=8",
    "quest:page_size=4",
    "quest:page_size=4:bounds_dtype=float32",
    "mpcache",
)
SHAPES = {  # (query heads, KV heads, head dim) of the packaged models' attention layers
    "qwen2.5-coder-0.5b": (14, 2, 64),
    "qwen2.5-coder-1.5b": (12, 2, 128),
    "smollm2-135m": (9, 3, 64),
    "gemma3-270m": (4, 1, 256),
}


class Attention(torch.nn.Module):
    """What SDPA reads of an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def prefilled(method: str, tokens: int, keys: torch.Tensor, values: torch.Tensor, **params) -> SqueezeLayer:
    """A layer holding ``keys``/``values`` (1, H_kv, L, D) as after a dense prefill of L tokens, selecting
    ``tokens`` per step (the layer is a selecting one: ``dense_layers = 0``)."""
    components = get_method(method, **params).components()
    layer = SqueezeLayer(components, Budget.parse(tokens), layer_idx=0, num_layers=1)
    layer.update(keys, values)
    length = keys.shape[2]
    layer.prompt_lengths = torch.tensor([length])
    layer.prompt_end = layer.seen
    if components.select is not None:
        components.select.set_budget(layer.prompt_lengths, torch.tensor([tokens]))
        layer._refresh_selection()  # the page bounds a prefill leaves
    return layer


def measure(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, h_kv, d = SHAPES[args.model]
    module = Attention(h // h_kv)
    rows = []
    for context in args.contexts:
        keys = torch.randn(1, h_kv, context, d)
        values = torch.randn(1, h_kv, context, d)
        layers = {("full", 1.0): prefilled("full", context, keys, values)}
        for spec in args.methods:
            extra = {"dense_layers": 0} if spec.name == "quest" else {"static_keep": 1.0}
            for share in args.shares:
                tokens = max(1, round(share * context))
                layers[(spec.label, share)] = prefilled(
                    spec.name, tokens, keys, values, **spec.params, **extra
                )
        del keys, values
        attend = {key: [] for key in layers}
        append = {key: [] for key in layers}
        scaling = d**-0.5
        with torch.inference_mode():
            for step in range(args.warmup + args.steps):
                k1, v1 = torch.randn(1, h_kv, 1, d), torch.randn(1, h_kv, 1, d)
                q1 = torch.randn(1, h, 1, d)
                for key, layer in layers.items():
                    start = time.perf_counter()
                    layer.update(k1, v1)
                    middle = time.perf_counter()
                    layer.attend(module, q1, None, scaling)
                    stop = time.perf_counter()
                    if step >= args.warmup:
                        append[key].append(middle - start)
                        attend[key].append(stop - middle)
        base = statistics.median(attend[("full", 1.0)])
        for (method, share), times in attend.items():
            rows.append(
                {
                    "context": context,
                    "method": method,
                    "share": share,
                    "attend_ms": 1e3 * statistics.median(times),
                    "ratio": statistics.median(times) / base,
                    "append_ms": 1e3 * statistics.median(append[(method, share)]),
                    "metadata_bytes": layers[(method, share)].nbytes() - layers[("full", 1.0)].nbytes(),
                    "kv_bytes": layers[(method, share)].kv_nbytes(),
                }
            )
        del layers
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Shapes of `{args.model}` (one attention layer), fp32, {args.threads} CPU thread, batch 1; median of "
        f"{args.steps} decode steps after {args.warmup} warm-up steps, the layers stepped in turn. Command: "
        f"`{COMMAND}`. `attention` is the layer's attention call per step (for a selecting layer: page scores, "
        "top-k, gather, SDPA over the chosen rows); `ratio` is against the full layer in the same run; "
        "`append` (the new row's copy, the same for all) is not in it. `bounds` are the page bounds a "
        "selecting layer stores beside every row (all rows kept: the keys and values are the full layer's), in "
        "fp16 unless the row says `bounds_dtype=float32`.",
        "",
        "| context | method | attended share | attention ms/step | ratio to full | append ms/step | bounds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['method']} | {r['share']:g} | {r['attend_ms']:.2f} | {r['ratio']:.2f}x "
            f"| {r['append_ms']:.2f} | {r['metadata_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(SHAPES))
    parser.add_argument(
        "--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192, 16384]
    )
    parser.add_argument(
        "--shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.25, 0.5]
    )
    parser.add_argument(
        "--methods",
        type=lambda s: [MethodSpec.parse(m) for m in s.split(",")],
        default=[MethodSpec.parse(m) for m in DEFAULT_METHODS],
        help=f"comma list of NAME or NAME:PARAM=VALUE (default: {', '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--write", action="store_true", help="replace the selection_speed block in docs/RESULTS.md"
    )
    args = parser.parse_args()
    body = table(measure(args), args)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "selection_speed", body)


if __name__ == "__main__":
    main()
