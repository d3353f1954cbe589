"""Attention: the ``kvsqueeze`` attention function and what scorers observe of it."""

from kvsqueeze.attention.interface import ATTENTION_NAME, enable, register_attention, squeeze_attention
from kvsqueeze.attention.observation import Observation

__all__ = ["ATTENTION_NAME", "Observation", "enable", "register_attention", "squeeze_attention"]
