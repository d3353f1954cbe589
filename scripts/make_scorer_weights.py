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

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--documents", "18", "--held-out", "2", "--tokens", "1024"]
MODELS = (
    "smollm2-135m",
    "qwen2.5-coder-0.5b",
)  # full-attention packaged models (kvzip needs no sliding layers)


def main(aliases: list[str]) -> None:
    from kvsqueeze.models import is_installed, load_model
    from kvsqueeze.models.fingerprint import model_fingerprint
    from kvsqueeze.weights import SHIPPED_DIR, user_weights_path

    for alias in aliases or [a for a in MODELS if is_installed(a)]:
        subprocess.run(
            [sys.executable, "-m", "kvsqueeze.cli.main", "calibrate", "--model", alias, *SETTINGS], check=True
        )
        model, _ = load_model(alias)
        made = user_weights_path("kvzap", model_fingerprint(model))
        shutil.copy(made, SHIPPED_DIR / f"kvzap-{alias}.safetensors")
        print(f"{alias}: {made} -> {SHIPPED_DIR / f'kvzap-{alias}.safetensors'}")


if __name__ == "__main__":
    main(sys.argv[1:])
