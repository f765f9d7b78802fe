"""lhcompile: rewrite the SDPA calls of a traced model into Lighthouse attention for long-context training."""

from .config import LighthouseConfig
from .ops import lighthouse_attention

__all__ = ["LighthouseConfig", "lighthouse_attention"]
