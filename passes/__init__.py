"""Pure FX graph transformations for lhcompile: find SDPA sites, rewrite them, restore them.

Nothing here knows about kernels: the rewrite takes the replacement as a callable.
"""

from .match import SdpaSite, find_sdpa_sites
from .restore import restore_sdpa
from .rewrite import REWRITE_TAG, rewrite_sdpa

__all__ = ["REWRITE_TAG", "SdpaSite", "find_sdpa_sites", "restore_sdpa", "rewrite_sdpa"]
