"""Side virtual environments for tools whose pins clash with ours (kvpress, vLLM): create, install, run.

Both baselines pin a transformers release kvsqueeze does not support, so each gets its own venv under the
kvsqueeze cache, built once and checked by a marker file of the versions it holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def venv_python(path: Path) -> Path:
    """The interpreter of the venv at ``path``."""
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_ready(path: Path, marker: str, expected: dict[str, str]) -> bool:
    """Whether the venv at ``path`` has its python and a marker file ``marker`` that records ``expected``."""
    if not (venv_python(path).exists() and (path / marker).exists()):
        return False
    try:
        return json.loads((path / marker).read_text()) == expected
    except (OSError, json.JSONDecodeError):
        return False


def last_line(text: str) -> str:
    """The last line of an error output, skipping pip's trailing "for help visit <url>" pointers."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if "for help visit" not in line]
    return (useful or lines or ["no output"])[-1]


def clean_env() -> dict[str, str]:
    """Our environment minus what would leak this venv into the other one; hub access off."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_step(cmd: list[str], what: str) -> str:
    """Run ``cmd``; a one-line ValueError with the last line of its error output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    if proc.returncode != 0:
        raise ValueError(f"{what} failed: {last_line(proc.stderr or proc.stdout)}")
    return proc.stdout


def create_venv(path: Path, what: str, progress: bool = True) -> Path:
    """A venv at ``path`` (created if missing); returns its python."""
    python = venv_python(path)
    if not python.exists():
        if progress:
            print(f"creating the {what} venv in {path}", file=sys.stderr)
        run_step([sys.executable, "-m", "venv", str(path)], f"creating a venv in {path}")
    return python


def pip_install(
    python: Path, packages: list[str], *, progress: bool = True, extra: Sequence[str] = ()
) -> None:
    """``pip install packages`` into the venv of ``python`` (``extra``: more pip flags)."""
    if progress:
        print(
            f"installing {' '.join(packages)} into {python.parent.parent} (may take minutes)", file=sys.stderr
        )
    run_step(
        [str(python), "-m", "pip", "install", "--quiet", *extra, *packages],
        f"installing {' '.join(packages)}",
    )
