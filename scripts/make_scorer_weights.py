"""Make the learned-scorer weights that ship for the packaged models (kvsqueeze/weights/kvzap-<alias>.safetensors).

    .venv/bin/python scripts/make_scorer_weights.py                      # every packaged model installed
    .venv/bin/python scripts/make_scorer_weights.py qwen2.5-coder-0.5b   # one

Each file is ``kvsqueeze calibrate --model ALIAS --method kvzap`` with the settings below (native kvzip run
on offline documents, a ridge fit per layer; resumable), copied into the package. The file's metadata names
the model, its fingerprint, the documents, the training tokens, the held-out R^2 and the seconds it took.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--documents", "18", "--held-out", "2", "--tokens", "1024"]
# full-attention packaged models (kvzip needs no sliding layers) and the dtype each is scored in: the 1.5B
# model in bfloat16 (2.35x faster prefill on this CPU, the dtype block of docs/RESULTS.md), the first two
# as they were made
MODELS = {"smollm2-135m": "float32", "qwen2.5-coder-0.5b": "float32", "qwen2.5-coder-1.5b": "bfloat16"}


def main(aliases: list[str]) -> None:
    from kvsqueeze.models import is_installed, load_model
    from kvsqueeze.models.fingerprint import model_fingerprint
    from kvsqueeze.weights import SHIPPED_DIR, user_weights_path

    for alias in aliases or [a for a in MODELS if is_installed(a)]:
        dtype = MODELS.get(alias, "float32")
        command = ["calibrate", "--model", alias, "--dtype", dtype, *SETTINGS]
        subprocess.run([sys.executable, "-m", "kvsqueeze.cli.main", *command], check=True)
        model, _ = load_model(alias, dtype=getattr(torch, dtype))  # the fingerprint calibrate saved under
        made = user_weights_path("kvzap", model_fingerprint(model))
        shutil.copyfile(made, SHIPPED_DIR / f"kvzap-{alias}.safetensors")
        print(f"{alias}: {made} -> {SHIPPED_DIR / f'kvzap-{alias}.safetensors'}")


if __name__ == "__main__":
    main(sys.argv[1:])
