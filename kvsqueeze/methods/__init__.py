"""Named methods. Importing this package registers them all."""

from kvsqueeze.methods import (  # noqa: F401
    adakv,
    cake,
    d2o,
    full,
    h2o,
    kivi,
    knorm,
    kvzap,
    kvzip,
    mass,
    mpcache,
    prefixkv,
    pyramidkv,
    quest,
    random,
    snapkv,
    streaming_llm,
    zipcache,
)
from kvsqueeze.methods.adakv import AdaKV
from kvsqueeze.methods.base import (
    METHODS,
    Components,
    Composed,
    Method,
    Schedule,
    get_method,
    hyperparameters,
    register,
)
from kvsqueeze.methods.cake import Cake
from kvsqueeze.methods.d2o import D2O
from kvsqueeze.methods.full import Full
from kvsqueeze.methods.h2o import H2O
from kvsqueeze.methods.kivi import KIVI
from kvsqueeze.methods.knorm import Knorm
from kvsqueeze.methods.kvzap import KVzap
from kvsqueeze.methods.kvzip import KVzip
from kvsqueeze.methods.mass import Mass
from kvsqueeze.methods.mpcache import MPCache
from kvsqueeze.methods.prefixkv import PrefixKV
from kvsqueeze.methods.profiled import LayerProfile, Profiled, compute_profile, with_profile
from kvsqueeze.methods.pyramidkv import PyramidKV
from kvsqueeze.methods.quest import Quest
from kvsqueeze.methods.random import Random
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.methods.streaming_llm import StreamingLLM
from kvsqueeze.methods.zipcache import ZipCache

__all__ = [
    "H2O",
    "KIVI",
    "ZipCache",
    "Composed",
    "AdaKV",
    "Cake",
    "D2O",
    "Mass",
    "MPCache",
    "Quest",
    "LayerProfile",
    "PrefixKV",
    "Profiled",
    "compute_profile",
    "with_profile",
    "Knorm",
    "KVzap",
    "KVzip",
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
    "hyperparameters",
    "register",
]
