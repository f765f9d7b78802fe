"""What a graph's node metadata says about a value."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx


def node_shape(node: Any) -> tuple[Any, ...] | None:
    """Shape of a node's tensor value as recorded by export/make_fx ('val'), Dynamo ('example_value') or ShapeProp."""
    value = _tensor_value(node)
    if value is not None:
        return tuple(value.shape)
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def node_device(node: Any) -> torch.device | None:
    """Device of a node's tensor value as recorded by export/make_fx ('val') or Dynamo ('example_value')."""
    value = _tensor_value(node)
    return None if value is None else value.device


def node_dtype(node: Any) -> torch.dtype | None:
    """Dtype of a node's tensor value as recorded by export/make_fx ('val') or Dynamo ('example_value')."""
    value = _tensor_value(node)
    return None if value is None else value.dtype


def _tensor_value(node: Any) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return val
    return None


# the traced frame's local that holds the root module: L['self'], L['args'][0] when forward is wrapped by a
# decorator taking *args, L['this'] for forward(this, x), G['model'] for a global
_ROOT = re.compile(r"^(L\['(args|kwargs)'\]\[[^]]*\]|[LG]\[[^]]*\])\.?")
# what Dynamo and wrappers put between a user's module names: a bound method's closure cell
# (layers.0.attention.forward.__closure__.0.cell_contents.__self__.inner_attention), a module's __dict__ and
# _modules, torch.compile's, checkpoint_wrapper's and FSDP1's wrapped modules
_NOT_MODULE_NAMES = re.compile(
    r"\.(forward\.__closure__\.\d+\.cell_contents(\.__self__)?|__dict__|_modules|_orig_mod|_checkpoint_wrapped_module"
    r"|_fsdp_wrapped_module)"
    r"(?=\.|$)"
)


def user_path(path: str) -> str:
    """A module, parameter or buffer as the user names it ('model.layers.0.self_attn'), from the path Dynamo
    writes for it (L['self']._modules['model'].layers[0].self_attn, ..._buffers['mask'])."""
    path = "." + _ROOT.sub("", path)
    path = re.sub(r"\._(modules|parameters|buffers)\['([^']+)'\]", r".\2", path)
    path = re.sub(r"\[['\"]?([^]'\"]+)['\"]?\]", r".\1", path)
    return _NOT_MODULE_NAMES.sub("", path).lstrip(".")


def join_path(prefix: str, path: str) -> str:
    """Two dotted module paths one after the other ('' stands for the root)."""
    return ".".join(p for p in (prefix, path) if p)


def input_name(source: str) -> str:
    """A graph input as the user names it: the model's argument 'attention_mask' for L['attention_mask'] or
    L['kwargs']['attention_mask'], 'argument 1' for L['args'][1]; other sources as Dynamo writes them."""
    if m := re.fullmatch(r"L\['kwargs'\]\['([^']+)'\]|L\['([^']+)'\]", source):
        return m.group(1) or m.group(2)
    if m := re.fullmatch(r"L\['args'\]\[(\d+)\]", source):
        return f"argument {m.group(1)}"
    return source


def source_name(node: fx.Node) -> str | None:
    """Where Dynamo took a graph input from (L['self']._modules['h']._buffers['mask'], L['attention_mask']), or
    None for graphs not captured by Dynamo."""
    name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
    name = name() if callable(name) else name  # a method before torch 2.12
    return name if isinstance(name, str) else None


def lifted_tensor(node: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a graph input that Dynamo lifted (a parameter, a buffer), if it is still alive."""
    try:
        value = node.meta["grapharg"].example
    except (KeyError, AttributeError, AssertionError, TypeError):
        return None
    return value if isinstance(value, torch.Tensor) else None
