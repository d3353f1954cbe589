"""Run in the vLLM venv by tests/test_vllm_connector.py: a segment saved and loaded back through
KVSqueezeConnector, against the KV vLLM computes. Prints one JSON line of measurements.

    <vllm venv python> tests/vllm/roundtrip.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine and worker in this process: the test reads both
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch
from vllm import LLM, SamplingParams
from vllm.distributed.kv_transfer import get_kv_transfer_group

from kvsqueeze.vllm import CONNECTOR_CONFIG, share_request
from kvsqueeze.vllm.connector import cpu_block_layout
from kvsqueeze.vllm.paged import read_rows
from kvsqueeze.vllm.plan import rows_key

HEADER = "<|im_start|>system\nYou are a careful reader.<|im_end|>\n<|im_start|>user\nDocument:\n"
OTHER_HEADER = "<|im_start|>system\nYou are a meticulous fact checker who reads well.<|im_end|>\n<|im_start|>user\nDocument:\n"
DOCUMENT = "The access code of project Heron is 4821. " + "Rivers flow to the sea and the sea is wide. " * 20
QUESTION = "\n\nQuestion: What is the access code of project Heron?<|im_end|>\n<|im_start|>assistant\n"


def main(model_dir: str) -> None:
    # no prefix caching: the connector supplies every loaded row (vLLM's cache would hold whole blocks)
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        kv_transfer_config=CONNECTOR_CONFIG,
    )
    connector = get_kv_transfer_group()
    loaded: list[tuple[torch.Tensor, torch.Tensor]] = []  # what each load left in vLLM's cache
    load = connector.start_load_kv

    def load_and_read_back(forward_context, **kwargs):
        load(forward_context, **kwargs)
        for job in connector._get_connector_metadata().loads:
            rows = [
                read_rows(connector.kv_caches[n], job.slots, connector.layout) for n in connector.layer_names
            ]
            loaded.append((torch.stack([k for k, _ in rows]), torch.stack([v for _, v in rows])))

    connector.start_load_kv = load_and_read_back
    tokenizer = llm.get_tokenizer()

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(ids: list[int], share: tuple[int, int] | None = None) -> str:
        extra = share_request(share) if share else None
        params = SamplingParams(max_tokens=16, temperature=0, extra_args=extra)
        output = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        out.setdefault("loaded_tokens", []).append(output.kv_transfer_params["kvsqueeze"]["loaded_tokens"])
        return output.outputs[0].text

    header, other, doc, question = encode(HEADER), encode(OTHER_HEADER), encode(DOCUMENT), encode(QUESTION)
    h, o, n = len(header), len(other), len(doc)
    out: dict = {"header_tokens": h, "other_header_tokens": o, "document_tokens": n}
    probed = cpu_block_layout(
        llm.llm_engine.vllm_config, connector.block_size, connector.layout.keys.shape[1], torch.float32
    )
    out["layout_probed_twice_equal"] = torch.equal(probed.keys, connector.layout.keys)

    run(header + doc, (h, h + n))  # computed by vLLM; the connector keeps the header and the document
    computed = connector.store.get(rows_key("p", header)), connector.store.get(rows_key("s", doc))
    out["answer_same_offset"] = run(header + doc + question)  # header and document loaded where computed
    keys, values = loaded[-1]
    want_keys = torch.cat([computed[0].keys, computed[1].keys], dim=2)
    want_values = torch.cat([computed[0].values, computed[1].values], dim=2)
    out["same_offset_rows"] = keys.shape[2]
    out["same_offset_max_abs_diff"] = max(
        (keys - want_keys).abs().max().item(), (values - want_values).abs().max().item()
    )

    # the document computed after another header (one token short, so it is stored apart) ...
    run(other + doc[:-1], (o, o + n - 1))
    recomputed = connector.store.get(rows_key("s", doc[:-1]))
    # ... and the first one loaded there, its keys turned from offset h to offset o
    out["answer_shifted"] = run(other + doc + question)
    keys, values = loaded[-1]
    keys, values = keys[:, :, o : o + n - 1], values[:, :, o : o + n - 1]
    out["shift"] = o - h
    out["shifted_layer0_key_max_abs_diff"] = (keys[0] - recomputed.keys[0]).abs().max().item()
    out["layer0_key_scale"] = recomputed.keys[0].abs().max().item()
    out["shifted_layer0_value_max_abs_diff"] = (values[0] - recomputed.values[0]).abs().max().item()
    # deeper layers differ by what the document read before it (the other header): reported, not asserted
    out["shifted_deeper_key_max_abs_diff"] = (keys[1:] - recomputed.keys[1:]).abs().max().item()

    # the workers' store lets everything go: the planned load fails, vLLM recomputes, the plan forgets it
    connector.store.clear()
    out["answer_after_eviction"] = run(other + doc + question)
    out["answer_after_forgetting"] = run(other + doc + question)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
