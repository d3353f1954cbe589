"""kvsqueeze: adaptive KV-cache compression for Hugging Face causal LMs, with real memory savings."""

from kvsqueeze.attention import enable, register_attention
from kvsqueeze.cache import Budget, SqueezeCache
from kvsqueeze.generation import GenerationResult, generate
from kvsqueeze.methods import METHODS, Method, get_method
from kvsqueeze.models import DEFAULT_MODEL, load_model

register_attention()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "Budget",
    "GenerationResult",
    "Method",
    "SqueezeCache",
    "enable",
    "generate",
    "get_method",
    "load_model",
    "register_attention",
]
