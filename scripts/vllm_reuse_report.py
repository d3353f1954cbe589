"""The multi-agent reuse benchmark through vLLM (issue 23), written into docs/RESULTS.md.

Runs in the vLLM venv (``kvsqueeze.vllm.env`` builds it; ``kvsqueeze vllm-env`` prints its python)::

    $(.venv/bin/kvsqueeze vllm-env) scripts/vllm_reuse_report.py            # print the table
    $(.venv/bin/kvsqueeze vllm-env) scripts/vllm_reuse_report.py --write    # and publish it

vLLM engines on the same HF folder (the packaged Qwen2.5-Coder-0.5B's, which ``kvsqueeze serve --engine vllm``
or ``kvsqueeze.models.packaged_hf_folder`` saves) answer the same queries of :mod:`kvsqueeze.bench.multiagent`
(agents with different roles over a shared document), interleaved query by query so a loaded machine slows
them alike: ``full`` (no prefix caching: every prompt computed), ``prefix caching`` (vLLM's own, in 128-token
blocks) and ``kvsqueeze`` (prefix caching plus :class:`kvsqueeze.vllm.connector.KVSqueezeConnector`);
``--engines 'full,prefix caching,kvsqueeze kvcomm'`` runs the connector with KVCOMM's offsets instead (its
own block). Each document is indexed once, after the first agent's header, on the engines that cache (timed
apart). Reported: accuracy, agreement with ``full``'s answers, reuse (prompts with KV from the connector; the
share of prompt tokens not computed) and the summed time to first token as a ratio to ``full`` and to prefix
caching. ``--render FILE --write`` republishes a saved run's block. Three fp32 engines hold about 16 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "bench" / "vllm"
# engine -> the connector's policy (None: no connector)
ENGINES = {"full": None, "prefix caching": None, "kvsqueeze": "plain", "kvsqueeze kvcomm": "kvcomm"}
DEFAULT_ENGINES = "full,prefix caching,kvsqueeze"
ENGINE_TEXT = {
    "full": "`full` computes every prompt (no prefix caching)",
    "prefix caching": "`prefix caching` is vLLM's own (whole 128-token blocks of an identical prefix)",
    "kvsqueeze": "`kvsqueeze` adds `KVSqueezeConnector`, which loads an agent's own header (exact rows kept from "
    "its first prompt) and the stored document, its keys turned to the agent's offset, and lets vLLM compute the "
    "question, the earlier answers and the closing text (kvsqueeze's `plain(recompute_tail=N)`)",
    "kvsqueeze kvcomm": "`kvsqueeze kvcomm` is the connector with KVCOMM's offsets added to the document: an "
    "agent's first two prompts with a document it has no offsets for are computed and measured (real minus "
    "reused rows), later documents get the blend of those measurements",
}


def _extra(engines: list[str]) -> list[str]:
    """The engines a run adds to the default ones, as name parts (``kvsqueeze-kvcomm``)."""
    return [name.replace(" ", "-") for name in engines if name not in DEFAULT_ENGINES.split(",")]


def stem_of(engines: list[str]) -> str:
    """The records' file stem of a run of ``engines``."""
    return "-".join(["qwen2.5-coder-0.5b-reuse", *_extra(engines)])


def block_of(engines: list[str]) -> str:
    """The docs/RESULTS.md block of a run of ``engines``: ``vllm_reuse``, or with the added engines."""
    return "_".join(["vllm_reuse", *(name.replace("-", "_") for name in _extra(engines))])


def engine(name: str, model_dir: str, max_model_len: int):
    from vllm import LLM

    from kvsqueeze.vllm import CONNECTOR_CONFIG

    options = {"enable_prefix_caching": name != "full"}
    if ENGINES[name] is not None:
        options["kv_transfer_config"] = CONNECTOR_CONFIG | {
            "kv_connector_extra_config": {"policy": ENGINES[name]}
        }
    return LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=max_model_len,
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,  # per-request metrics: the time to first token
        **options,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="HF folder (default: the packaged Qwen 0.5B's)")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--doc-words", type=int, default=800)
    parser.add_argument("--doc-tokens", type=int, default=900)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--engines", default=DEFAULT_ENGINES, help=f"comma list of {', '.join(ENGINES)} (full comes first)"
    )
    parser.add_argument("--render", type=Path, default=None, help="print (and --write) a saved run's block")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if engines[0] != "full" or any(name not in ENGINES for name in engines):
        parser.error(
            f"--engines: a comma list of {', '.join(ENGINES)} starting with full, got {args.engines!r}"
        )
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["args"].setdefault("engines", DEFAULT_ENGINES)  # runs before --engines existed
        result["summary"] = summarize(result["records"], result["args"]["engines"].split(","))
    else:
        result = run(args, engines)
        (OUT_DIR / f"{stem_of(engines)}.json").write_text(json.dumps(result, indent=1))
    body = body_of(result)
    print(body)
    if args.write:
        from kvsqueeze.bench.report import replace_block

        block = block_of(result["args"]["engines"].split(","))
        replace_block(ROOT / "docs" / "RESULTS.md", block, body)


def run(args: argparse.Namespace, engines: list[str]) -> dict:
    """Every engine over the same queries, interleaved query by query; the run's records."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm
    from vllm import SamplingParams

    from kvsqueeze.bench.multiagent import (
        ROLES,
        agent_header,
        agent_prompt,
        first_code,
        first_sentence,
        make_queries,
    )
    from kvsqueeze.models import cache_dir
    from kvsqueeze.vllm import share_request

    wall_start = time.perf_counter()
    model_dir = args.model_dir or str(cache_dir() / "models" / "qwen2.5-coder-0.5b-hf")
    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(
            f"no HF folder at {model_dir}: save it first with .venv/bin/python -c "
            "\"from kvsqueeze.models import packaged_hf_folder; packaged_hf_folder('qwen2.5-coder-0.5b')\""
        )
    llms = {name: engine(name, model_dir, 4096) for name in engines}
    tokenizer = llms["full"].get_tokenizer()
    queries = make_queries(
        args.queries, args.doc_words, seed=args.seed, tokenizer=tokenizer, doc_tokens=args.doc_tokens
    )

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    greedy = SamplingParams(max_tokens=16, temperature=0)
    index_seconds = {name: 0.0 for name in engines[1:]}
    records = []
    for qi, query in enumerate(queries):
        header, document = encode(agent_header(ROLES[0])), encode(query.document)
        share = share_request((len(header), len(header) + len(document)))
        for name in engines[1:]:  # the engines that cache index the document once, after agent 1's header
            start = time.perf_counter()
            indexing = SamplingParams(max_tokens=1, extra_args=share)
            llms[name].generate({"prompt_token_ids": header + document}, indexing, use_tqdm=False)
            index_seconds[name] += time.perf_counter() - start
        for name, llm in llms.items():
            answers: list[str] = []
            for k in range(args.agents):
                ids = [t for segment in agent_prompt(ROLES[k], query, answers) for t in encode(segment.text)]
                out = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0]
                text = first_sentence(out.outputs[0].text)
                answers.append(text)
                loaded = ((out.kv_transfer_params or {}).get("kvsqueeze") or {}).get("loaded_tokens", 0)
                records.append(
                    {
                        "query": qi,
                        "agent": k,
                        "engine": name,
                        "tokens": len(ids),
                        "cached_tokens": out.num_cached_tokens or 0,
                        "loaded_tokens": loaded,
                        "ttft": out.metrics.first_token_latency,
                        "answer": text,
                        "correct": first_code(text) == query.answer,
                    }
                )
            print(f"query {qi} {name}: {answers} (gold {query.answer})", flush=True)
    return {
        "args": vars(args) | {"render": None},
        "vllm": vllm.__version__,
        "index_seconds": index_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "summary": summarize(records, engines),
        "records": records,
    }


def summarize(records: list[dict], engines: list[str]) -> dict[str, dict]:
    """Per engine: accuracy, agreement with full, connector reuse, tokens not computed, summed TTFT."""
    from kvsqueeze.bench.multiagent import first_code

    full = {(r["query"], r["agent"]): first_code(r["answer"]) for r in records if r["engine"] == "full"}
    ttft = {name: sum(r["ttft"] for r in records if r["engine"] == name) for name in engines}
    out = {}
    for name in engines:
        rows = [r for r in records if r["engine"] == name]
        agree = [first_code(r["answer"]) == full[(r["query"], r["agent"])] for r in rows]
        out[name] = {
            "calls": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "agreement_with_full": sum(agree) / len(rows),
            "connector_prompts": sum(r["loaded_tokens"] > 0 for r in rows) / len(rows),
            "not_computed_share": sum(r["cached_tokens"] for r in rows) / sum(r["tokens"] for r in rows),
            "ttft_seconds": ttft[name],
            "speedup_vs_full": ttft["full"] / ttft[name],
            "speedup_vs_prefix_caching": ttft["prefix caching"] / ttft[name]
            if "prefix caching" in ttft
            else None,
        }
    return out


def body_of(result: dict) -> str:
    """The RESULTS block of one run."""
    args, summary = result["args"], result["summary"]
    engines = args["engines"].split(",")
    command = (
        "$(.venv/bin/kvsqueeze vllm-env) scripts/vllm_reuse_report.py --write "
        f"--queries {args['queries']} --agents {args['agents']} --doc-words {args['doc_words']} "
        f"--doc-tokens {args['doc_tokens']} --seed {args['seed']}"
        + ("" if args["engines"] == DEFAULT_ENGINES else f" --engines '{args['engines']}'")
    )
    tokens = [r["tokens"] for r in result["records"] if r["engine"] == "full"]
    indexing = {name: seconds for name, seconds in result["index_seconds"].items() if name != "full"}
    index = ", ".join(f"{seconds:.1f} s on `{name}`" for name, seconds in indexing.items())
    connectors = [name for name in engines if ENGINES[name] is not None]
    checks = []
    for name in connectors:
        s = summary[name]
        versus = s["speedup_vs_prefix_caching"]
        counted = ""
        if versus:  # both engines indexed the documents once: count it on both sides
            prefix = summary["prefix caching"]["ttft_seconds"] + indexing["prefix caching"]
            counted = f" ({prefix / (s['ttft_seconds'] + indexing[name]):.2f}x counting the indexing on both)"
        checks.append(
            f"`{name}`: {100 * s['connector_prompts']:.0f}% of prompts reused, TTFT "
            + (
                f"{versus:.2f}x faster than prefix caching alone{counted}"
                if versus
                else f"{s['speedup_vs_full']:.2f}x full's"
            )
            + f", accuracy {100 * (s['accuracy'] - summary['full']['accuracy']):+.0f} points against vLLM's full "
            "recompute"
        )
    return "\n".join(
        [
            f"Multi-agent retrieval QA through vLLM {result['vllm']} (CPU build, fp32, eager, one core), "
            f"Qwen2.5-Coder-0.5B from the packaged GGUF saved as an HF folder: {args['agents']} agents with "
            f"different roles x {args['queries']} queries = {len(tokens)} prompts per engine, prompts "
            f"{min(tokens)}-{max(tokens)} tokens, the same queries as the transformers runs above. "
            f"Command: `{command}` (records in `{(OUT_DIR / stem_of(engines)).relative_to(ROOT)}.json`).",
            "",
            table(summary),
            "",
            "Engines: "
            + "; ".join(ENGINE_TEXT[name] for name in engines)
            + f". Each document was indexed once on the caching engines ({index}; a request of agent "
            "1's header and the document, marked shared; not in the TTFT sums). TTFT: vLLM's time to first token "
            "per request, summed over the run; ratios are to the other engines' sums in the same run. Prompt "
            "tokens not computed: vLLM's `num_cached_tokens` (its prefix cache plus the connector's rows). "
            "Accuracy: the gold access code is the answer's first 4-digit number.",
            "",
            "Issue 23's check: "
            + "; ".join(checks)
            + f". Wall time of this report: {result['wall_seconds']:.0f} s.",
        ]
    )


def table(summary: dict[str, dict]) -> str:
    lines = [
        "| engine | accuracy | agrees with full | prompts served by the connector | prompt tokens not computed | "
        "TTFT s | vs full | vs prefix caching |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summary.items():
        versus = s["speedup_vs_prefix_caching"]
        lines.append(
            f"| {name} | {100 * s['accuracy']:.0f} | {100 * s['agreement_with_full']:.0f} | "
            f"{100 * s['connector_prompts']:.0f}% | {100 * s['not_computed_share']:.0f}% | {s['ttft_seconds']:.1f} | "
            f"{s['speedup_vs_full']:.2f}x | " + (f"{versus:.2f}x |" if versus else "– |")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
