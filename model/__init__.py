"""The Parameter Golf record model (PR #1523) and everything from tokens to score."""

from .config import PRESETS, GPTConfig, get_config
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_config"]
