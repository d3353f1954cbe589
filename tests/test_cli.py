"""The command line, run in-process on the packaged SmolLM2 (and one real subprocess for the entry point)."""

from __future__ import annotations

import io
import subprocess
import sys

from kvsqueeze.cli.main import main


def test_methods_lists_every_method_with_parameters(capsys):
    import kvsqueeze

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in kvsqueeze.METHODS:
        assert name in out
    assert "window=32" in out and "recent_share=0.5" in out


def test_models_lists_every_alias_with_its_state(capsys, monkeypatch):
    from kvsqueeze.models import PACKAGED_MODELS, packaged

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PACKAGED_MODELS)
    assert any(line.startswith("qwen2.5-coder-1.5b ") and "28 layers" in line for line in lines)
    monkeypatch.setattr(packaged, "find_spec", lambda name: None)
    assert main(["models"]) == 0
    assert all("  not installed  " in line for line in capsys.readouterr().out.splitlines())


def test_info_reports_kv_bytes_per_token(smollm2, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    # 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 4 bytes (fp32)
    assert "llama" in out and "8192" in out and f"{30 * 3 * 64 * 2 * 4:,}" in out


def test_generate_prints_text_and_the_bytes_line(smollm2, capsys):
    assert (
        main(
            [
                "generate",
                "Name one planet of the solar system.",
                "--method",
                "h2o",
                "--budget",
                "0.5",
                "-n",
                "8",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "full vs" in captured.err and "kept" in captured.err and "h2o" in captured.err


def test_generate_reads_stdin(smollm2, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hello."))
    assert main(["generate", "-", "--method", "streaming_llm", "--budget", "16", "-n", "4"]) == 0
    assert "streaming_llm" in capsys.readouterr().err


def test_entry_point_runs_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "kvsqueeze.cli.main", "generate", "hi", "--method", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown method" in proc.stderr


def test_info_in_bfloat16_halves_the_bytes_per_token(capsys):
    assert main(["info", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and f"{30 * 3 * 64 * 2 * 2:,}" in out


def test_generate_summary_names_a_budget_only_where_the_method_uses_one(smollm2, capsys):
    for method, shown in (("full", False), ("kivi", False), ("streaming_llm", True)):
        assert main(["generate", "Say hello.", "--method", method, "-n", "4"]) == 0
        summary = capsys.readouterr().err.strip().splitlines()[-1]
        assert (" @ " in summary) == shown, summary
