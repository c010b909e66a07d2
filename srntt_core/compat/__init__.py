"""Drop-in replacements for the search/transfer code of other Ref-SR codebases.

- :mod:`.ttsr`: TTSR's ``SearchTransfer`` and mmagic's ``SearchTransformer`` (same grid, padding 1).
- :mod:`.c2matching`: C2-Matching / DATSR ``feature_match_index`` and correspondence matching.
- :mod:`.masa`: MASA-SR's coarse-to-fine ``search`` / ``search_org`` / ``transfer`` (and an exact mode).
- :mod:`.srntt`: SRNTT's ``Swap`` / srntt-pytorch's ``Swapper`` multi-layer swap and weight maps.
- :mod:`.registry`: registration in BasicSR-style and mmagic-style registries (imports neither).

Each produces the original's numbers with :func:`srntt_core.swap.patch_match` and
:func:`srntt_core.swap.feature_swap`, without the original's N_query x N_ref buffers. See docs/compat.md.
"""

from __future__ import annotations

from .c2matching import (
    Correspondence,
    CorrespondenceMatcher,
    correspondence_match,
    feature_match_index,
    flow_maps,
    index_to_flow,
    offset_maps,
    similarity_maps,
)
from .masa import MASAMethods, MASAWarp, masa_warp
from .registry import register_basicsr, register_mmagic
from .srntt import SRNTTSwap, Swap, Swapper, srntt_swap, srntt_weight_maps, tf_resize_bicubic
from .ttsr import SearchTransfer, SearchTransformer, search_transfer

__all__ = [
    "Correspondence", "CorrespondenceMatcher", "correspondence_match", "feature_match_index",
    "index_to_flow", "flow_maps", "offset_maps", "similarity_maps",
    "MASAMethods", "MASAWarp", "masa_warp",
    "register_basicsr", "register_mmagic",
    "SRNTTSwap", "Swap", "Swapper", "srntt_swap", "srntt_weight_maps", "tf_resize_bicubic",
    "SearchTransfer", "SearchTransformer", "search_transfer",
]
