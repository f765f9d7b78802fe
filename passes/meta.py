"""What a graph's node metadata says about a value."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def node_shape(node: Any) -> tuple[Any, ...] | None:
    """Shape of a node's tensor value as recorded by export/make_fx ('val'), Dynamo ('example_value') or ShapeProp."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
