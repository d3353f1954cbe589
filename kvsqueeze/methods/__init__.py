"""Named methods. Importing this package registers them all."""

from kvsqueeze.methods import full, h2o, knorm, pyramidkv, random, snapkv, streaming_llm  # noqa: F401
from kvsqueeze.methods.base import METHODS, Components, Method, Schedule, get_method, register
from kvsqueeze.methods.full import Full
from kvsqueeze.methods.h2o import H2O
from kvsqueeze.methods.knorm import Knorm
from kvsqueeze.methods.pyramidkv import PyramidKV
from kvsqueeze.methods.random import Random
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.methods.streaming_llm import StreamingLLM

__all__ = [
    "H2O",
    "Knorm",
    "METHODS",
    "Components",
    "Full",
    "Method",
    "PyramidKV",
    "Random",
    "Schedule",
    "SnapKV",
    "StreamingLLM",
    "get_method",
    "register",
]
