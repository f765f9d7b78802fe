"""lhcompile: rewrite the SDPA calls of a traced model into Lighthouse attention for long-context training."""

from .api import apply, backend, inspect, restore
from .backend import LighthouseBackend
from .config import LighthouseConfig
from .ops import lighthouse_attention
from .report import LighthouseWarning, Report, SiteReport
from .rotary import Rotary

__all__ = [
    "LighthouseBackend",
    "LighthouseConfig",
    "LighthouseWarning",
    "Report",
    "Rotary",
    "SiteReport",
    "apply",
    "backend",
    "inspect",
    "lighthouse_attention",
    "restore",
]
