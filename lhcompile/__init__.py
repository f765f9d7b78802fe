"""lhcompile: rewrite the SDPA calls of a traced model into Lighthouse attention for long-context training."""

from .api import LighthouseBackend, apply, backend, inspect, restore
from .config import LighthouseConfig
from .debug import Report, SiteReport
from .ops import lighthouse_attention

__all__ = [
    "LighthouseBackend",
    "LighthouseConfig",
    "Report",
    "SiteReport",
    "apply",
    "backend",
    "inspect",
    "lighthouse_attention",
    "restore",
]
