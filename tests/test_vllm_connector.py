"""KVSqueezeConnector inside real vLLM: runs only where the vLLM venv exists (kvsqueeze.vllm.env)."""

from __future__ import annotations

import json
import subprocess
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


@pytest.fixture(scope="module")
def roundtrip() -> dict:
    from kvsqueeze.models import packaged_hf_folder

    try:
        folder = packaged_hf_folder("qwen2.5-coder-0.5b", progress=False)
    except ValueError as err:
        pytest.skip(f"the packaged Qwen2.5-Coder-0.5B is not installed ({err})")
    proc = subprocess.run(
        [str(venv_python(VENV)), str(ROUNDTRIP), str(folder)],
        capture_output=True,
        text=True,
        env=clean_env() | {"OMP_NUM_THREADS": "1"},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
