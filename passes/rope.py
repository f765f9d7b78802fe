"""Find the rotary position embedding (RoPE) that an SDPA call's query or key went through, and undo its order.

Lighthouse can rotate q and k after selection, each gathered entry at the position of the last token it covers,
instead of pooling rotated vectors (see docs/algorithm.md). For that the pass needs, per SDPA input, the value
before the rotation and the model's own rotation tables. Recognised rotations, in any layout whose last axis is
the head dimension:

- ``rotate_half``: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., h:], x[..., :h])``
  (Hugging Face's ``apply_rotary_pos_emb``, torchtitan's ``CosSinRoPE``; every HF RoPE variant, scaled, YaRN,
  Llama-3 or long-RoPE, differs only in its tables);
- ``rotate_pairs``: the same with ``rotate(x) = stack(-x[..., 1::2], x[..., 0::2], -1).flatten(-2)`` (GLM);
- ``complex``: ``view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs_cis).flatten(3)`` (torchtitan's
  ``ComplexRoPE``, Meta's Llama);
- ``pairs``: that multiplication written out, ``stack(a*cos - b*sin, a*sin + b*cos, -1).flatten(-2)`` with
  ``a, b = x[..., 0::2], x[..., 1::2]`` (ChatGLM);
each also as partial rotary, ``cat(rotation(x[..., :r]), x[..., r:])``.

Between the rotation and SDPA the value may pass through *carriers*: ops that move axes, cast, copy, scale by a
constant or repeat heads (repeat_kv) but keep the head dimension as the last axis and never mix positions. The
position axis is followed through them, so the sequence axis SDPA sees is proven to be the rotation's position
axis. ``unrotated`` replays the carriers on the value before the rotation.

Graphs from Dynamo (torch functions, methods) and from torch.export or make_fx (ATen ops) are both read.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from torch.fx.experimental.symbolic_shapes import statically_known_true

from .meta import node_shape

aten = torch.ops.aten

Form = Literal["rotate_half", "rotate_pairs", "complex", "pairs"]
"""How a model rotates: ``x*cos + rotate_half(x)*sin`` (Hugging Face), the same with rotate_pairs (adjacent pairs,
GLM, Cohere), complex multiplication of adjacent pairs by ``freqs_cis`` (torchtitan, Meta's Llama), or the same
written out on the pairs: ``stack(a*cos - b*sin, a*sin + b*cos, -1).flatten(-2)`` with a, b = x[..., 0::2],
x[..., 1::2] (ChatGLM)."""
HALF_WIDTH_FORMS = ("complex", "pairs")
"""Forms whose tables hold one entry per pair of head dims (width rotary_dim / 2)."""


def _ops(*targets: Any) -> frozenset:
    return frozenset(targets)


_GETITEM = _ops(operator.getitem)
_SLICE = _ops(aten.slice.Tensor)
_MUL = _ops(operator.mul, torch.mul, aten.mul.Tensor, "mul")
_ADD = _ops(operator.add, torch.add, aten.add.Tensor, "add")
_SUB = _ops(operator.sub, torch.sub, aten.sub.Tensor, "sub")
_NEG = _ops(operator.neg, torch.neg, aten.neg.default, "neg")
_CAT = _ops(torch.cat, aten.cat.default, torch.concat, torch.concatenate)
_STACK = _ops(torch.stack, aten.stack.default)
_AS_COMPLEX = _ops(torch.view_as_complex, aten.view_as_complex.default)
_AS_REAL = _ops(torch.view_as_real, aten.view_as_real.default)
_RESHAPE = _ops(torch.reshape, aten.view.default, aten._unsafe_view.default, aten.reshape.default, "view", "reshape")
_FLATTEN = _ops(torch.flatten, aten.flatten.using_ints, "flatten")
_UNFLATTEN = _ops(torch.unflatten, aten.unflatten.int, "unflatten")
# value-preserving, layout-keeping ops (their data input is the first argument)
_SAME_LAYOUT = _ops("contiguous", "to", "type_as", "float", "bfloat16", "half", "double", "clone", torch.clone,
                    aten.clone.default, aten._to_copy.default, aten.alias.default, aten.contiguous.default,
                    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
                    torch.ops.prims.convert_element_type.default)
_TRANSPOSE = _ops("transpose", torch.transpose, aten.transpose.int, "swapaxes", torch.swapaxes)
_PERMUTE = _ops("permute", torch.permute, aten.permute.default)
_UNSQUEEZE = _ops("unsqueeze", torch.unsqueeze, aten.unsqueeze.default)
_EXPAND = _ops("expand", aten.expand.default)
_SCALE = _ops(operator.mul, operator.truediv, torch.mul, torch.div, aten.mul.Tensor, aten.div.Tensor,
              aten.mul.Scalar, aten.div.Scalar, "mul", "div")
_CARRIERS = _SAME_LAYOUT | _SCALE | _TRANSPOSE | _PERMUTE | _UNSQUEEZE | _EXPAND | _RESHAPE | _FLATTEN | _CAT | _GETITEM


def _is(node: Any, targets: frozenset) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _shape(node: Any) -> tuple[Any, ...] | None:
    """A node's shape: ints, or symbols where the graph was captured with dynamic shapes (compared with ``_same``,
    never with ``==``, which would add a guard to a graph already captured)."""
    shape = node_shape(node)
    return shape if shape is not None and all(isinstance(s, (int, torch.SymInt)) for s in shape) else None


def _same(a: Any, b: Any) -> bool:
    """Whether two sizes are equal, ints or symbols alike (a symbol equals what it is known to equal)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _last_slice(node: Any) -> tuple[fx.Node, int, int, int] | None:
    """(x, start, stop, step) of a slice of x's last axis: x[..., a:b:c] or aten.slice(x, -1, a, b, c)."""
    if _is(node, _GETITEM):
        x, index = node.args
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)):
            return None
        s = index[1]
        start, stop, step = s.start, s.stop, s.step
    elif _is(node, _SLICE):
        x = node.args[0]
        shape = _shape(x)
        if shape is None or _dim(_arg(node, 1, "dim", 0), len(shape)) != len(shape) - 1:
            return None
        start, stop, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    else:
        return None
    shape = _shape(x)
    if shape is None or not isinstance(shape[-1], int) or not all(v is None or isinstance(v, int)
                                                                  for v in (start, stop, step)):
        return None
    start, stop, step = slice(start, stop, step).indices(shape[-1])
    return x, start, stop, step


def _operands(node: fx.Node, targets: frozenset) -> tuple[Any, Any] | None:
    """The two operands of a binary op among ``targets`` (either a method or a function call)."""
    if not _is(node, targets) or len(node.args) != 2 or (node.kwargs and set(node.kwargs) != {"alpha"}) \
            or node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args[0], node.args[1]


def _cat_parts(node: Any, dim: int = -1) -> list[Any] | None:
    if not _is(node, _CAT):
        return None
    parts, d = list(_arg(node, 0, "tensors")), _arg(node, 1, "dim", 0)
    shape = _shape(node)
    return parts if shape is not None and _dim(d, len(shape)) == _dim(dim, len(shape)) else None


def _rotated_half(node: Any) -> tuple[fx.Node, Form] | None:
    """x and the form when node is rotate_half(x) or rotate_pairs(x)."""
    parts = _cat_parts(node)
    if parts is not None and len(parts) == 2 and _is(parts[0], _NEG):
        upper, lower = _last_slice(parts[0].args[0]), _last_slice(parts[1])
        if upper and lower and upper[0] is lower[0]:
            width = _shape(upper[0])[-1]
            if width % 2 == 0 and upper[1:] == (width // 2, width, 1) and lower[1:] == (0, width // 2, 1):
                return upper[0], "rotate_half"
    pair = _interleaved(node)
    if pair is not None and _is(pair[0], _NEG):
        odd, even = _last_slice(pair[0].args[0]), _last_slice(pair[1])
        if odd and even and odd[0] is even[0]:
            width = _shape(odd[0])[-1]
            if odd[1:] == (1, width, 2) and even[1:] == (0, width, 2) and _same_shape(_shape(node), _shape(odd[0])):
                return odd[0], "rotate_pairs"
    return None


def _interleaved(node: Any) -> list[Any] | None:
    """[a, b] when node is flatten(stack([a, b], -1), -2) (or a reshape of it): a and b's entries interleaved."""
    if not (_is(node, _FLATTEN) or _is(node, _RESHAPE)):
        return None
    stacked = node.args[0]
    if not _is(stacked, _STACK) or _arg(stacked, 1, "dim", 0) not in (-1, len(_shape(stacked) or ()) - 1):
        return None
    pair = list(_arg(stacked, 0, "tensors"))
    return pair if len(pair) == 2 else None


@dataclass(frozen=True)
class _Rotation:
    raw: fx.Node
    form: Form
    tables: tuple[fx.Node, ...]
    """(cos, sin) multipliers, or (freqs_cis,) for the complex form."""


def _mul_add(node: fx.Node) -> _Rotation | None:
    """x * cos + rotate(x) * sin, in any operand order."""
    terms = _operands(node, _ADD)
    if terms is None:
        return None
    factors = [_operands(t, _MUL) if isinstance(t, fx.Node) else None for t in terms]
    if None in factors:
        return None
    for (a, b), (c, d) in (factors, factors[::-1]):
        for x, cos in ((a, b), (b, a)):
            for rot, sin in ((c, d), (d, c)):
                found = _rotated_half(rot)
                if found and found[0] is x and isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
                    return _Rotation(x, found[1], (cos, sin))
    return None


def _complex(node: fx.Node) -> _Rotation | None:
    """flatten(view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs), -2): x and freqs."""
    if not (_is(node, _FLATTEN) or _is(node, _RESHAPE)):
        return None
    real = node.args[0]
    out = _shape(node)
    if not _is(real, _AS_REAL) or out is None or not _same_shape(_shape(real), (*out[:-1], out[-1] // 2, 2)):
        return None
    factors = _operands(real.args[0], _MUL)
    if factors is None:
        return None
    for z, freqs in (factors, factors[::-1]):
        if _is(z, _AS_COMPLEX) and isinstance(freqs, fx.Node):
            pairs = z.args[0]
            if (_is(pairs, _RESHAPE) or _is(pairs, _UNFLATTEN)) and _same_shape(_shape(pairs), _shape(real)):
                return _Rotation(pairs.args[0], "complex", (freqs,))
    return None


def _factor(product: Any, x: fx.Node) -> Any:
    """The other factor of ``product`` when it is x times something, else None."""
    factors = _operands(product, _MUL) if isinstance(product, fx.Node) else None
    if factors is None or x not in factors:
        return None
    return factors[1] if factors[0] is x else factors[0]


def _pairs(node: fx.Node) -> _Rotation | None:
    """flatten(stack(a*cos - b*sin, a*sin + b*cos, -1), -2) with a, b the even and odd entries of one x."""
    parts = _interleaved(node)
    if parts is None or _operands(parts[0], _SUB) is None or _operands(parts[1], _ADD) is None:
        return None
    (a_cos, b_sin), (a_sin, b_cos) = _operands(parts[0], _SUB), _operands(parts[1], _ADD)
    for term in (a_cos, a_sin):
        for a in term.args if isinstance(term, fx.Node) else ():
            even = _last_slice(a)
            if not (even and even[1] == 0 and even[3] == 2 and even[2] == _shape(even[0])[-1]):
                continue
            cos, sin = _factor(a_cos, a), _factor(a_sin, a)
            b = next((f for f in (b_sin.args if isinstance(b_sin, fx.Node) else ()) if _factor(b_sin, f) is sin), None)
            odd = _last_slice(b)
            if cos is not None and sin is not None and odd and odd[0] is even[0] and odd[1] == 1 and odd[3] == 2 \
                    and _factor(b_cos, b) is cos and _same_shape(_shape(node), _shape(even[0])):
                return _Rotation(even[0], "pairs", (cos, sin))
    return None


def _rotation(node: fx.Node) -> tuple[_Rotation, int] | None:
    """The rotation that computes node, and how many leading head dims it rotates (partial rotary: the rest is
    concatenated unrotated)."""
    parts = _cat_parts(node)
    if parts is not None and len(parts) == 2:
        rotated, passed = parts
        kept = _last_slice(passed)
        inner = (_mul_add(rotated) or _complex(rotated) or _pairs(rotated)) if isinstance(rotated, fx.Node) else None
        if inner and kept and kept[3] == 1:
            source = _last_slice(inner.raw)
            width = _shape(kept[0])[-1]
            if source and source[0] is kept[0] and source[1:] == (0, kept[1], 1) and kept[2] == width:
                return _Rotation(kept[0], inner.form, inner.tables), kept[1]
    found = _mul_add(node) or _complex(node) or _pairs(node)
    return (found, _shape(found.raw)[-1]) if found else None


@dataclass(frozen=True)
class RopeMatch:
    """How one SDPA input was rotated, and what carried the rotated value to SDPA."""

    raw: fx.Node
    """The value before the rotation (head dimension last)."""
    rotated: fx.Node
    """The rotation's output."""
    carriers: tuple[fx.Node, ...]
    """The ops from ``rotated`` to SDPA's input, in order."""
    form: Form
    rotary_dim: int
    """Leading head dims rotated (the head dim itself unless partial rotary)."""
    tables: tuple[fx.Node, ...]
    """(cos, sin), or (freqs_cis,) for the complex form, as the rotation multiplies by them (half width for the
    complex and pairs forms)."""
    table_position_axis: int
    """The tables' axis of positions (they broadcast against the rotated value, padded on the left to its rank)."""
    table_shape: tuple[int, ...]
    """The tables' shape, padded on the left to the rotated value's rank (the complex form's: of its complex view)."""


@dataclass
class _Axes:
    """Where the position and batch axes of the rotated value are after each carrier."""

    shape: tuple[int, ...]
    position: int
    batch: int | None


def _carry(node: fx.Node, axes: _Axes) -> _Axes | str:
    """The axes after a carrier op applied to a value laid out as ``axes`` (or why node is no carrier)."""
    out = _shape(node)
    rank = len(axes.shape)
    if out is None:
        return f"{node.name} has no static shape"
    if not _same(out[-1], axes.shape[-1]):
        return f"{node.name} changes the head dimension"

    def moved(mapping) -> _Axes:
        return _Axes(out, mapping(axes.position), None if axes.batch is None else mapping(axes.batch))

    if _is(node, _SAME_LAYOUT) and _same_shape(out, axes.shape):
        return moved(lambda a: a)
    if _is(node, _SCALE) and _same_shape(out, axes.shape) and isinstance(node.args[1] if len(node.args) > 1 else None,
                                                            (int, float)):
        return moved(lambda a: a)
    if _is(node, _TRANSPOSE):
        i, j = (_dim(d, rank) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        return moved(lambda a: j if a == i else i if a == j else a)
    if _is(node, _PERMUTE):
        dims = _arg(node, 1, "dims")
        dims = list(dims) if isinstance(dims, (list, tuple)) else list(node.args[1:])
        dims = [_dim(d, rank) for d in dims]
        if dims[-1] != rank - 1:
            return f"{node.name} moves the head dimension"
        return moved(dims.index)
    if _is(node, _UNSQUEEZE):
        d = _dim(_arg(node, 1, "dim"), rank + 1)
        return moved(lambda a: a + 1 if a >= d else a)
    if _is(node, _EXPAND) and len(out) == rank and _same(out[axes.position], axes.shape[axes.position]):
        return moved(lambda a: a)
    if _is(node, _GETITEM) and isinstance(node.args[1], tuple) and all(
            i is None or i is Ellipsis or i == slice(None) for i in node.args[1]):
        index = list(node.args[1])
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = rank - sum(i is not None for i in index if i is not Ellipsis)
            index[at:at + 1] = [slice(None)] * fill
        index += [slice(None)] * (rank - sum(i is not None for i in index))
        new_of, src = {}, 0
        for pos, i in enumerate(index):
            if i is not None:
                new_of[src], src = pos, src + 1
        return moved(new_of.__getitem__)
    if _is(node, _RESHAPE) or _is(node, _FLATTEN):
        return _reshaped(node, axes, out)
    parts = _cat_parts(node, _arg(node, 1, "dim", 0)) if _is(node, _CAT) else None
    if parts is not None:
        live = [p for p in parts if _shape(p) is None or not _same(math.prod(_shape(p)), 0)]
        if len(live) == 1 and _same_shape(out, axes.shape):
            return moved(lambda a: a)
    return f"{node.name} ({getattr(node.target, '__name__', node.target)}) is not an op that only moves, casts, " \
           "copies, scales or repeats the rotated value"


def _reshaped(node: fx.Node, axes: _Axes, out: tuple[int, ...]) -> _Axes | str:
    """A reshape keeps an axis when the elements before it and the axis itself keep their extents."""

    def keep(a: int | None) -> int | None | str:
        if a is None:
            return None
        before = math.prod(axes.shape[:a])
        for b in range(len(out)):
            if _same(math.prod(out[:b]), before) and _same(out[b], axes.shape[a]):
                return b
        return "lost"

    position, batch = keep(axes.position), keep(axes.batch)
    if position == "lost":
        return f"{node.name} reshapes the position axis"
    return _Axes(out, position, None if batch == "lost" else batch)


_VIEWS = _GETITEM | _SLICE | _TRANSPOSE | _PERMUTE | _UNSQUEEZE | _EXPAND | _RESHAPE | _FLATTEN | _UNFLATTEN | _ops(
    "narrow", "select", "view_as", "unbind", "split", "chunk", torch.narrow, torch.select, aten.select.int,
    aten.narrow.default, aten.as_strided.default, aten.split.Tensor, aten.unbind.int)
"""Ops whose result may share storage with their first argument: a write into it writes into that argument."""


def _written_in_place(node: fx.Node) -> fx.Node | None:
    """An op that writes into node's value, or into a view of it (``x[..., :4] = 0``, ``x.mul_(3)``,
    ``x[..., :1].copy_(y)``), or None."""
    stack, seen = [node], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for user in value.users:
            if user.op not in ("call_function", "call_method") or not user.args or user.args[0] is not value:
                continue
            name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
            mutable = isinstance(user.target, torch._ops.OpOverload) and any(
                a.alias_info is not None and a.alias_info.is_write for a in user.target._schema.arguments[:1])
            if user.target is operator.setitem or (name.endswith("_") and not name.startswith("_")) or mutable:
                return user
            if _is(user, _VIEWS):
                stack.append(user)
    return None


def find_rotation(sdpa_input: fx.Node, seq_len: int) -> RopeMatch | str:
    """How the SDPA input ``sdpa_input`` (B, H, seq_len, d) was rotated, or why no rotation was found (also when
    the rotated value is written into in place before SDPA: replaying the carriers on the unrotated value would
    drop the write)."""
    carriers: list[fx.Node] = []
    node = sdpa_input
    while True:
        written = _written_in_place(node)
        if written is not None:
            what = written.target if isinstance(written.target, str) else getattr(written.target, "__name__",
                                                                                   written.target)
            return (f"going up from {sdpa_input.name}, {node.name} is written into in place ({written.name}: {what}) "
                    "after the rotation, so q or k cannot be taken unrotated")
        found = _rotation(node)
        if found is not None:
            return _match(found[0], found[1], node, carriers[::-1], seq_len)
        data = _carried_input(node) if _is(node, _CARRIERS) else None
        if not isinstance(data, fx.Node):
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            return (f"going up from {sdpa_input.name}, {node.name} ({what}) is neither a recognised RoPE rotation "
                    f"({', '.join(Form.__args__)}) nor an op that only moves, casts, copies, scales or repeats it")
        carriers.append(node)
        node = data


def _carried_input(node: fx.Node) -> Any:
    if _is(node, _CAT):
        parts = _cat_parts(node, _arg(node, 1, "dim", 0))
        live = [p for p in parts or () if _shape(p) is None or not _same(math.prod(_shape(p)), 0)]
        return live[0] if len(live) == 1 else None
    return node.args[0] if node.args else None


def _match(rotation: _Rotation, rotary_dim: int, rotated: fx.Node, carriers: list[fx.Node], seq_len: int
           ) -> RopeMatch | str:
    written = _written_in_place(rotation.raw)
    if written is not None:
        return (f"the value before the rotation, {rotation.raw.name}, is written into in place ({written.name}), so "
                "it cannot be read unrotated at the attention call")
    shape = _shape(rotated)
    if shape is None or len(shape) < 3:
        return f"the rotation {rotated.name} has no static shape of rank >= 3"
    view = (*shape[:-1], rotary_dim // 2 if rotation.form in HALF_WIDTH_FORMS else rotary_dim)
    tables = [_shape(t) for t in rotation.tables]
    if any(t is None or len(t) > len(view) for t in tables):
        return f"the rotation tables of {rotated.name} have no static shape that broadcasts against it"
    tables = [(1,) * (len(view) - len(t)) + t for t in tables]
    if not all(_same_shape(t, tables[0]) for t in tables):
        return f"the rotation tables of {rotated.name} differ in shape"
    table = tables[0]
    position = [a for a in range(1, len(view) - 1) if _same(view[a], seq_len) and _same(table[a], seq_len)]
    if len(position) != 1:
        return f"the rotation tables of {rotated.name} have no single axis of {seq_len} positions"
    if not _same(table[-1], view[-1]) or any(not _same(table[a], 1) for a in range(1, len(view) - 1)
                                             if a != position[0]) \
            or not (_same(table[0], 1) or _same(table[0], view[0])):
        return (f"the rotation tables of {rotated.name} ({'x'.join(map(str, table))}) vary along more than batch and "
                "position")
    axes = _Axes(shape, position[0], 0)
    for carrier in carriers:
        axes = _carry(carrier, axes)
        if isinstance(axes, str):
            return f"between the rotation and SDPA, {axes}"
    if len(axes.shape) != 4 or axes.position != 2 or (table[0] != 1 and axes.batch != 0):
        return "the rotation's position axis is not SDPA's sequence axis"
    return RopeMatch(rotation.raw, rotated, tuple(carriers), rotation.form, rotary_dim, rotation.tables,
                     position[0], table)


def unrotated(match: RopeMatch) -> fx.Node:
    """The SDPA input as it would be without the rotation: the carriers replayed on ``match.raw``, inserted at the
    graph's current insertion point."""
    graph = match.raw.graph
    env = {match.rotated: match.raw}
    for carrier in match.carriers:
        env[carrier] = graph.node_copy(carrier, lambda n: env.get(n, n))
    return env[match.carriers[-1]] if match.carriers else match.raw


def find_qk_rotation(q: fx.Node, k: fx.Node, seq_len: int) -> tuple[RopeMatch, RopeMatch] | str:
    """The rotations of an SDPA call's query and key, which must be one rotation with the same tables; or why
    they were not found."""
    found = {name: find_rotation(node, seq_len) for name, node in (("query", q), ("key", k))}
    problems = [f"{name}: {why}" for name, why in found.items() if isinstance(why, str)]
    if problems:
        return "; ".join(problems)
    mq, mk = found["query"], found["key"]
    if (mq.form, mq.rotary_dim) != (mk.form, mk.rotary_dim) or not _same_shape(mq.table_shape, mk.table_shape) \
            or not all(_same_value(a, b) for a, b in zip(mq.tables, mk.tables)):
        return "query and key are rotated differently (other tables, form or rotary dims)"
    return mq, mk


def _same_value(a: Any, b: Any) -> bool:
    """Whether two graph values are computed alike from the same inputs (Llama 4 indexes its complex table
    ``freqs_cis[:, :, None, :]`` once for q and once for k: two nodes, one value)."""
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a.op == b.op and a.op in ("call_function", "call_method") and a.target == b.target \
            and _same_value(a.args, b.args) and _same_value(a.kwargs, b.kwargs)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[key], b[key]) for key in a)
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b
