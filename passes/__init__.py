"""Pure FX graph transformations for lhcompile: find SDPA sites, rewrite them, restore them.

Nothing here knows about kernels: the rewrite takes the replacement as a callable. Installed as
``lhcompile.passes``.
"""

from .causal_mask import MaskProof, Proofs, Resolve
from .match import SdpaSite, attention_like_calls, count_sdpa_calls, find_sdpa_sites, module_path
from .restore import restore_sdpa
from .rope import RopeMatch, find_qk_rotation, find_rotation, unrotated
from .rewrite import METADATA_TO_PORT, REWRITE_TAG, erase_unused, rewrite_sdpa
from .subgraphs import Subgraph, prune_unused_inputs, subgraph_calls

__all__ = [
    "METADATA_TO_PORT",
    "MaskProof",
    "Proofs",
    "REWRITE_TAG",
    "Resolve",
    "RopeMatch",
    "SdpaSite",
    "Subgraph",
    "attention_like_calls",
    "count_sdpa_calls",
    "erase_unused",
    "find_qk_rotation",
    "find_rotation",
    "find_sdpa_sites",
    "module_path",
    "prune_unused_inputs",
    "restore_sdpa",
    "rewrite_sdpa",
    "subgraph_calls",
    "unrotated",
]
