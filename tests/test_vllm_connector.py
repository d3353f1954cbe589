"""KVSqueezeConnector inside real vLLM: runs only where the vLLM venv exists (kvsqueeze.vllm.env)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvsqueeze.venvs import clean_env, venv_python
from kvsqueeze.vllm.env import MARKER, default_env_path

ROUNDTRIP = Path(__file__).with_name("vllm") / "roundtrip.py"
VENV = default_env_path()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VENV / MARKER).is_file(),
        reason=f"no vLLM venv at {VENV}: python -c 'from kvsqueeze.vllm.env import ensure_vllm_env; ensure_vllm_env()'",
    ),
]


def run_in_vllm_venv(script: Path) -> dict:
    """Run ``script`` on the packaged Qwen2.5-Coder-0.5B in the vLLM venv; the JSON line it prints last.

    vLLM's engine process may log its shutdown to stdout after that line, so the last line that is a JSON
    object is read.
    """
    from kvsqueeze.models import packaged_hf_folder

    try:
        folder = packaged_hf_folder("qwen2.5-coder-0.5b", progress=False)
    except ValueError as err:
        pytest.skip(f"the packaged Qwen2.5-Coder-0.5B is not installed ({err})")
    proc = subprocess.run(
        [str(venv_python(VENV)), str(script), str(folder)],
        capture_output=True,
        text=True,
        env=clean_env() | {"OMP_NUM_THREADS": "1"},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")))


@pytest.fixture(scope="module")
def roundtrip() -> dict:
    return run_in_vllm_venv(ROUNDTRIP)


def test_the_block_layout_is_probed_consistently(roundtrip):
    assert roundtrip["layout_probed_twice_equal"]


def test_a_segment_loaded_where_it_was_computed_is_exactly_vllms_kv(roundtrip):
    assert roundtrip["same_offset_rows"] == roundtrip["header_tokens"] + roundtrip["document_tokens"]
    assert roundtrip["same_offset_max_abs_diff"] == 0.0
    assert "4821" in roundtrip["answer_same_offset"]


def test_a_shifted_segment_matches_vllms_recomputed_kv_where_only_position_differs(roundtrip):
    # layer 0 reads nothing but its own token, so the shifted rows must equal the recomputed ones there
    assert roundtrip["shift"] != 0
    assert roundtrip["shifted_layer0_key_max_abs_diff"] <= 1e-5 * roundtrip["layer0_key_scale"] + 1e-4
    assert roundtrip["shifted_layer0_value_max_abs_diff"] == 0.0
    assert "4821" in roundtrip["answer_shifted"]


def test_rows_the_store_let_go_are_recomputed_then_no_longer_planned(roundtrip):
    # loads per request: indexing 0, same offset, indexing the other 0, shifted, after eviction, after forgetting
    planned, forgotten = roundtrip["loaded_tokens"][-2:]
    assert planned > 0 and forgotten == 0
    assert "4821" in roundtrip["answer_after_eviction"] and "4821" in roundtrip["answer_after_forgetting"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server():
    """``kvsqueeze serve --engine vllm`` on a loopback port (vLLM's OpenAI server with the connector)."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "kvsqueeze.cli.main",
        "serve",
        "--engine",
        "vllm",
        "--model",
        "qwen2.5-coder-0.5b",
    ]
    cmd += ["--port", str(port), "--served-name", "qwen", "--", "--enforce-eager", "--max-model-len", "2048"]
    env = clean_env() | {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"vLLM did not start: {(proc.stderr.read() if proc.stderr else '')[-2000:]}")
        time.sleep(2)
    yield f"http://127.0.0.1:{port}/v1"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_openai_client_stores_a_document_and_a_later_prompt_loads_it(vllm_server):
    from openai import OpenAI
    from transformers import AutoTokenizer

    from kvsqueeze.models import packaged_hf_folder

    tokenizer = AutoTokenizer.from_pretrained(packaged_hf_folder("qwen2.5-coder-0.5b", progress=False))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    header = encode("<|im_start|>system\nYou are a careful reader.<|im_end|>\n<|im_start|>user\nDocument:\n")
    document = encode("The access code of project Heron is 4821. " + "Rivers flow to the sea. " * 30)
    question = encode("\n\nWhat is the access code of project Heron?<|im_end|>\n<|im_start|>assistant\n")
    client = OpenAI(base_url=vllm_server, api_key="unused")
    share = {"kv_transfer_params": {"kvsqueeze": {"share": [[len(header), len(header) + len(document)]]}}}
    first = client.completions.create(model="qwen", prompt=header + document, max_tokens=1, extra_body=share)
    assert first.model_extra["kv_transfer_params"] == {"kvsqueeze": {"loaded_tokens": 0}}
    second = client.completions.create(
        model="qwen", prompt=header + document + question, max_tokens=16, temperature=0
    )
    # what vLLM's own prefix cache does not hold (whole 128-token blocks) came from the connector
    stored = len(header) + len(document)
    assert (
        second.model_extra["kv_transfer_params"]["kvsqueeze"]["loaded_tokens"] == stored - stored // 128 * 128
    )
    assert "4821" in second.choices[0].text


def test_kvcomm_anchors_let_another_agents_prompt_load_the_shared_document():
    """The kvcomm policy measures anchors on the first prompts, then loads the document's rows under another
    agent's header (shifted by its anchors' offsets), and those prompts still answer right."""
    prompts = run_in_vllm_venv(ROUNDTRIP.with_name("anchors.py"))["prompts"]
    loaded = [p for p in prompts if p["connector"].get("loaded_tokens", 0) > 0]
    assert loaded, prompts  # some prompt loaded the shared rows through the anchors
    assert all(p["right"] for p in loaded), loaded
