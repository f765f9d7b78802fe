"""Pure FX graph transformations for lhcompile: find attention sites of every kind, rewrite them, restore them.

Nothing here knows about kernels: the rewrite takes the replacement as a callable. Installed as
``lhcompile.passes``.
"""

from .causal_mask import MaskProof, Proofs, Resolve, causal_verdict
from .kinds import KINDS, SDPA_PARAMS, SDPA_TARGETS, attention_like_calls, count_sites, find_sites, kind_of
from .restore import restore_sites
from .rope import RopeMatch, find_qk_rotation, find_rotation, unrotated
from .rewrite import METADATA_TO_PORT, REWRITE_TAG, erase_unused, rewrite_sites
from .site import DocumentSource, Site, SiteKind, bind_arguments, module_path
from .subgraphs import Subgraph, copy_with_bodies, prune_unused_inputs, subgraph_calls
from .values import ValueNumbers, ancestors, evaluate, source, stateless

__all__ = [
    "KINDS",
    "METADATA_TO_PORT",
    "MaskProof",
    "Proofs",
    "REWRITE_TAG",
    "Resolve",
    "RopeMatch",
    "SDPA_PARAMS",
    "SDPA_TARGETS",
    "DocumentSource",
    "Site",
    "SiteKind",
    "Subgraph",
    "ValueNumbers",
    "attention_like_calls",
    "causal_verdict",
    "ancestors",
    "bind_arguments",
    "copy_with_bodies",
    "count_sites",
    "erase_unused",
    "evaluate",
    "find_qk_rotation",
    "find_rotation",
    "find_sites",
    "kind_of",
    "module_path",
    "prune_unused_inputs",
    "restore_sites",
    "rewrite_sites",
    "source",
    "stateless",
    "subgraph_calls",
    "unrotated",
]
