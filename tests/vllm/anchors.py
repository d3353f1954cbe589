"""Run in the vLLM venv by tests/test_vllm_connector.py: KVCOMM's anchors through KVSqueezeConnector.

Six documents are each shared by one agent (stored under its header) and then asked about by another whose
header differs, so the document's rows sit at other positions after another prefix. The kvcomm policy
measures anchors on the first prompts and loads the shared rows, offset by its anchors, on later ones. Prints
one JSON line: per prompt, what the connector reported and whether the answer is right.

    <vllm venv python> tests/vllm/anchors.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams

from kvsqueeze.bench.multiagent import (
    ROLES,
    agent_header,
    agent_prompt,
    first_code,
    first_sentence,
    make_queries,
)
from kvsqueeze.vllm import CONNECTOR_CONFIG, share_request


def main(model_dir: str) -> None:
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=4096,
        enforce_eager=True,
        seed=0,
        kv_transfer_config=CONNECTOR_CONFIG | {"kv_connector_extra_config": {"policy": "kvcomm"}},
    )
    tokenizer = llm.get_tokenizer()

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = []
    for query in make_queries(6, 300, seed=1, tokenizer=tokenizer, doc_tokens=350):
        header, document = encode(agent_header(ROLES[0])), encode(query.document)
        share = share_request((len(header), len(header) + len(document)))
        llm.generate(
            {"prompt_token_ids": header + document},
            SamplingParams(max_tokens=1, extra_args=share),
            use_tqdm=False,
        )
        ids = [t for segment in agent_prompt(ROLES[1], query, []) for t in encode(segment.text)]
        out = llm.generate(
            {"prompt_token_ids": ids}, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False
        )[0]
        answer = first_sentence(out.outputs[0].text)
        prompts.append(
            {
                "connector": (out.kv_transfer_params or {}).get("kvsqueeze", {}),
                "answer": answer,
                "gold": query.answer,
                "right": first_code(answer) == query.answer,
            }
        )
    print(json.dumps({"prompts": prompts}))


if __name__ == "__main__":
    main(sys.argv[1])
