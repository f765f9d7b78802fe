"""lhcompile: rewrite the SDPA calls of a traced model into Lighthouse attention for long-context training."""

from .api import apply, backend, inspect, restore
from .config import LighthouseConfig
from .operator.attention import lighthouse_attention
from .operator.documents import Documents, document_attention
from .report import LighthouseWarning, Report, SiteReport
from .selections import Selections, selections
from .operator.rotary import Rotary

__all__ = [
    "LighthouseConfig",
    "Documents",
    "LighthouseWarning",
    "Report",
    "Rotary",
    "Selections",
    "SiteReport",
    "apply",
    "backend",
    "document_attention",
    "inspect",
    "lighthouse_attention",
    "restore",
    "selections",
]


def __getattr__(name: str):
    # the framework integrations need their framework: imported on first use, not with lhcompile
    if name == "integrations":
        import importlib

        return importlib.import_module(f"{__name__}.integrations")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
