"""Attention heads as a pruning site: the projections that write a head, the attention op that
mixes it, and the output projection that reads it.

A head site is a canonical attention op (graphopt.library.attention) whose Q, KT and V each come
from a projection  P = x W (+ b)  [.., H*D]  (or one output of a Split of a merged Q/K/V
projection) through a head split  Reshape(P) [.., H, D]  and ops that treat every head alike
(Transpose, elementwise ops with side inputs of size 1 on the head axis such as rotary cos/sin,
Slice and Concat on other axes), and whose output reaches  Reshape [.., H*D] -> MatMul(., Wo)
the same way. Head h is then columns h*D..(h+1)*D of each projection (and of its bias) and the
same rows of Wo: removing it makes every matrix smaller and changes nothing else but the head
count, written in the Reshape targets that name it and in the op's attributes.

Preconditions (each refused with the reason):
1. Q, K and V have the same number of heads (grouped-query K/V, repeated before the op, are not
   pruned: removing a query head would need its whole group).
2. Every value between a projection and the op (and between the op and Wo) is read only inside
   that path: a K/V cache output or a second reader would see a different head count.
3. Side inputs on the way broadcast over heads (size 1 on the head axis, or lower rank); an
   attention bias with a head axis is a constant, sliced with the heads.
4. Reshape targets name the head count as -1, or as a literal in a constant (or in a constant
   piece of a Concat): a head count computed at run time is not rewritten.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.library.attention import is_canonical
from graphopt.passes._weights import add_initializer, const_array

PASS_THROUGH = frozenset({"Transpose", "Mul", "Div", "Add", "Sub", "Neg", "Slice", "Concat", "Cast", "Identity", "Where",
                          "IsNaN"})
MAX_DEPTH = 24  # nodes between a head split and the attention op


class Refused(Exception):
    """A head site that cannot be pruned, with the reason (the message)."""


@dataclasses.dataclass
class Projection:
    """Where the columns of one of Q, K, V live: MatMul(x, W) (+ Add b) (-> Split output `index`)."""
    matmul: ir.Node
    bias: ir.Node | None
    split: ir.Node | None
    index: int


@dataclasses.dataclass
class HeadSite:
    attention: ir.Node
    projections: list[Projection]  # Q, K, V
    targets: list[tuple[ir.Node, int, int]]  # (Reshape, position in its target, dims per head there: 1 or D)
    region: list[ir.Value]  # values whose head count changes
    down: ir.Node  # MatMul(., Wo)
    heads: int
    size: int
    bias_axis: int | None  # the attention bias's head axis (a constant, sliced with the heads)

    form = "heads"

    @property
    def name(self) -> str:
        return self.attention.name or self.attention.op_type

    @property
    def units(self) -> int:
        return self.heads

    @property
    def group(self) -> int:
        return self.size

    @property
    def rows(self) -> ir.Value:
        """The merged heads [.., H*D] that Wo reads: the rows the ranking and the refit read."""
        return self.down.inputs[0]

    @property
    def out(self) -> ir.Value:
        return self.down.outputs[0]

    @property
    def w2(self) -> np.ndarray:
        return const_array(self.down.inputs[1])

    @property
    def unit_flops(self) -> int:
        """Per token, what one head costs in the linear layers: multiply-adds x 2 of its
        columns in Q, K, V and its rows of Wo."""
        inputs = sum(const_array(p.matmul.inputs[1]).shape[0] for p in self.projections)
        return 2 * self.size * (inputs + self.w2.shape[1])

    def shrink(self, graph: ir.Graph, keep: np.ndarray) -> None:
        """Keep heads `keep` (sorted): projection columns, Reshape targets, the op's head count
        and a per-head bias. Wo is written by the caller (neurons.apply), refitted."""
        columns = (keep[:, None] * self.size + np.arange(self.size)).reshape(-1)
        merged: dict[int, list[Projection]] = {}
        for p in self.projections:
            merged.setdefault(id(p.matmul), []).append(p)
        for group in merged.values():
            first = group[0]
            if first.split is None:
                _take_columns(graph, first, columns)
                continue
            sizes = _split_sizes(first.split)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            cols, new_sizes = [], []
            for index, size in enumerate(sizes):
                mine = [p for p in group if p.index == index]
                cols.append(offsets[index] + (columns if mine else np.arange(size)))
                new_sizes.append(len(columns) if mine else int(size))
            _take_columns(graph, first, np.concatenate(cols))
            sizes_value = add_initializer(graph, first.split.inputs[0], np.array(new_sizes, np.int64), "split_pruned")
            if len(first.split.inputs) > 1 and first.split.inputs[1] is not None:
                first.split.replace_input_with(1, sizes_value)
            else:  # opset 18's equal split by num_outputs becomes explicit sizes
                first.split.resize_inputs(2)
                first.split.replace_input_with(1, sizes_value)
                first.split.attributes.pop("num_outputs", None)
        for reshape, position, per_head in self.targets:
            _set_target(graph, reshape, position, len(keep) * per_head)
        a = self.attention
        for attr in ("q_num_heads", "kv_num_heads"):
            if a.attributes.get_int(attr, 0):
                a.attributes[attr] = ir.AttrInt64(attr, len(keep))
        if self.bias_axis is not None:
            bias = a.inputs[3]
            a.replace_input_with(3, add_initializer(graph, bias, np.ascontiguousarray(np.take(const_array(bias), keep, axis=self.bias_axis)), "pruned"))
        for value in self.region:
            value.shape = None


def _shape_only(node: ir.Node) -> bool:
    """A reader of the shape only (Shape, Size): it follows the new head count by itself."""
    return (node.domain, node.op_type) in ops.SHAPE_ONLY_READERS


def _data_readers(value: ir.Value) -> list:
    return [u for u in value.uses() if not _shape_only(u.node)]


def _split_sizes(split: ir.Node) -> np.ndarray | None:
    """A Split's constant sizes (its input, or opset 18's num_outputs equal parts), or None."""
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const_array(split.inputs[1])
        return None if sizes is None else sizes.astype(np.int64)
    parts = split.attributes.get_int("num_outputs", 0)
    width = split.inputs[0].shape[-1] if split.inputs[0].shape is not None else None
    if not parts or not isinstance(width, int) or width % parts:
        return None
    return np.full(parts, width // parts, np.int64)


def _take_columns(graph: ir.Graph, p: Projection, columns: np.ndarray) -> None:
    w = const_array(p.matmul.inputs[1])
    p.matmul.replace_input_with(1, add_initializer(graph, p.matmul.inputs[1], np.ascontiguousarray(w[:, columns]), "pruned"))
    if p.bias is not None:
        index = next(i for i, v in enumerate(p.bias.inputs) if const_array(v) is not None)
        b = const_array(p.bias.inputs[index])
        p.bias.replace_input_with(index, add_initializer(graph, p.bias.inputs[index], np.ascontiguousarray(b[columns]), "pruned"))
    for value in (p.matmul.outputs[0], *(p.bias.outputs if p.bias else ()), *(p.split.outputs if p.split else ())):
        value.shape = None


def _target_piece(reshape: ir.Node, position: int) -> tuple[np.ndarray, ir.Node | None, int, int] | str:
    """(the constant array holding `position` of the Reshape's target, the Concat it is a piece
    of or None, that piece's input index, the offset in it), or why the target is not readable."""
    target = reshape.inputs[1]
    array = const_array(target)
    if array is not None:
        return array, None, -1, position
    concat = target.producer()
    if concat is None or (concat.domain, concat.op_type) != ops.CONCAT:
        return f"Reshape '{reshape.name}' takes its target from {concat.op_type if concat else 'an input'}"
    start = 0
    for index, piece in enumerate(concat.inputs):
        shape = piece.shape
        if shape is None or shape.rank() != 1 or not isinstance(shape[0], int):
            return f"a piece of Reshape '{reshape.name}''s target has an unknown length"
        if start <= position < start + shape[0]:
            array = const_array(piece)
            if array is None:
                return f"Reshape '{reshape.name}''s target computes the head count at run time"
            return array, concat, index, position - start
        start += shape[0]
    return f"Reshape '{reshape.name}''s target is shorter than its output"


def _target_blocker(reshape: ir.Node, position: int, count: int) -> str | None:
    found = _target_piece(reshape, position)
    if isinstance(found, str):
        return found
    array, _, _, offset = found
    return None if int(array[offset]) in (-1, count) else \
        f"Reshape '{reshape.name}''s target has {int(array[offset])} where the head count {count} goes"


def _set_target(graph: ir.Graph, reshape: ir.Node, position: int, count: int) -> None:
    array, concat, index, offset = _target_piece(reshape, position)
    if int(array[offset]) == -1:
        return  # the -1 takes the new count
    new = array.copy()
    new[offset] = count
    if concat is None:
        reshape.replace_input_with(1, add_initializer(graph, reshape.inputs[1], new, "pruned"))
        return
    inputs = list(concat.inputs)
    inputs[index] = add_initializer(graph, inputs[index], new, "pruned")
    copy = ir.node("Concat", inputs, attributes={"axis": concat.attributes.get_int("axis", 0)}, name=f"{concat.name}_pruned_{reshape.name}")
    graph.insert_before(reshape, copy)
    copy.outputs[0].type, copy.outputs[0].shape = concat.outputs[0].type, concat.outputs[0].shape
    reshape.replace_input_with(1, copy.outputs[0])


def _dims(value: ir.Value) -> list | None:
    return None if value.shape is None else list(value.shape)


def _is_split(node: ir.Node, heads: int, size: int) -> bool:
    """Reshape [.., H*D] -> [.., H, D]."""
    if (node.domain, node.op_type) != ops.RESHAPE:
        return False
    src, out = _dims(node.inputs[0]), _dims(node.outputs[0])
    return bool(src and out and len(out) == len(src) + 1 and out[-2:] == [heads, size] and src[-1] == heads * size)


def _axis_of(value: ir.Value, axis: int) -> int:
    """`axis` (from the end, negative) at the front-counted index in `value`."""
    return value.shape.rank() + axis


def _side_blocker(node: ir.Node, side: ir.Value, axis: int) -> str | None:
    """A side input of an elementwise op must broadcast over heads."""
    dims = _dims(side)
    if dims is None:
        return f"'{node.name}' reads '{side.name}' of unknown shape beside the heads"
    if len(dims) < -axis or dims[axis] == 1:
        return None
    return f"'{node.name}' reads '{side.name}' {dims}, which differs per head"


def _forward_axis(node: ir.Node, index: int, axis: int, on_path: set[int]) -> int | str:
    """The head axis (negative) of `node`'s output, given input `index` has it at `axis`;
    or why `node` does not treat the heads alike."""
    op = node.op_type
    if node.domain != "" or op not in PASS_THROUGH:
        return f"'{node.name}' ({node.domain or 'ai.onnx'}.{op}) is between a projection and the attention"
    rank = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else None
    if rank is None:
        return f"'{node.name}' has an output of unknown rank"
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        if perm is None:
            return f"Transpose '{node.name}' has no perm"
        return list(perm).index(rank + axis) - rank
    if op == "Slice":
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(rank)
        if axes is None or any((int(a) % rank) - rank == axis for a in np.atleast_1d(axes)):
            return f"Slice '{node.name}' may cut the head axis"
        return axis
    if op == "Concat":
        if node.attributes.get_int("axis", 0) % rank - rank == axis:
            return f"Concat '{node.name}' joins along the head axis"
        if any(id(v) not in on_path for v in node.inputs):
            return f"Concat '{node.name}' joins a head path with another tensor"
        return axis
    for i, side in enumerate(node.inputs):
        if i != index and id(side) not in on_path and (blocker := _side_blocker(node, side, axis)):
            return blocker
    return axis


def _trace_input(attention: ir.Node, value: ir.Value, heads: int, size: int) -> tuple[list[ir.Node], list[ir.Value], set[int]]:
    """Backward from an attention input: the head splits it comes from, the values in between,
    and the ids of the values on the head path."""
    splits, region, on_path = [], [], set()
    memo: dict[int, bool] = {}

    def walk(v: ir.Value, depth: int) -> bool:
        if id(v) in memo:
            return memo[id(v)]
        node = v.producer()
        found = False
        if node is not None and _is_split(node, heads, size):
            splits.append(node)
            found = True
        elif node is not None and depth < MAX_DEPTH and node.domain == "" and node.op_type in PASS_THROUGH:
            for u in node.inputs:
                if u is not None and const_array(u) is None and walk(u, depth + 1):
                    found = True
        memo[id(v)] = found
        if found:
            on_path.add(id(v))
            region.append(v)
        return found

    if not walk(value, 0):
        raise Refused(f"'{value.name}' does not come from a Reshape into {heads} heads of {size} "
                      "through ops that treat every head alike")
    return splits, region, on_path


def _check_path(splits: list[ir.Node], region: list[ir.Value], on_path: set[int], end: ir.Node, axis_at_end: int) -> None:
    """Forward from the head splits' outputs: every op treats heads alike, every reader stays on
    the path, and the head axis arrives where the attention op has it."""
    axes = {id(split.outputs[0]): -2 for split in splits}
    position = {id(n): i for i, n in enumerate(end.graph)} if end.graph is not None else {}
    for v in sorted(region, key=lambda v: position.get(id(v.producer()), -1)):  # producers before readers
        if v.is_graph_output():
            raise Refused(f"'{v.name}' is a graph output (a cache?): its head count would change")
        if id(v) not in axes:
            raise Refused(f"'{v.name}' mixes a head path with another tensor")
        for reader, index in v.uses():
            if _shape_only(reader):
                continue
            if reader is end:
                if axes[id(v)] != axis_at_end:
                    raise Refused(f"'{v.name}' reaches '{end.name}' with its heads on another axis")
                continue
            if not any(id(o) in on_path for o in reader.outputs):
                raise Refused(f"'{v.name}' is also read by '{reader.name}' ({reader.op_type}) off the head path")
            got = _forward_axis(reader, index, axes[id(v)], on_path)
            if isinstance(got, str):
                raise Refused(got)
            if axes.setdefault(id(reader.outputs[0]), got) != got:
                raise Refused(f"'{reader.name}' joins heads from different axes")


def _projection(value: ir.Value, role: str) -> Projection:
    node = value.producer()
    split, index = None, 0
    if node is not None and (node.domain, node.op_type) == ops.SPLIT:
        if _split_sizes(node) is None or node.attributes.get_int("axis", 0) not in (-1, value.shape.rank() - 1 if value.shape else -1):
            raise Refused(f"the {role} projection is split by '{node.name}' without constant sizes on the last axis")
        split, index = node, list(node.outputs).index(value)
        value, node = node.inputs[0], node.inputs[0].producer()
    bias = None
    if node is not None and (node.domain, node.op_type) == ops.ADD:
        consts = [v for v in node.inputs if const_array(v) is not None]
        width = value.shape[-1] if value.shape is not None else None
        if len(consts) != 1 or const_array(consts[0]).shape != (width,):
            raise Refused(f"the {role} projection's Add '{node.name}' has no constant bias of its width")
        bias = node
        node = next(v for v in node.inputs if const_array(v) is None).producer()
    if node is None or (node.domain, node.op_type) != ops.MATMUL or const_array(node.inputs[1]) is None \
            or const_array(node.inputs[1]).ndim != 2:
        raise Refused(f"the {role} heads are not written by a MatMul with a constant 2-D weight")
    for v in (node.outputs[0], *(bias.outputs if bias else ())):
        if len(_data_readers(v)) != 1 or v.is_graph_output():
            raise Refused(f"the {role} projection's '{v.name}' has another reader")
    return Projection(node, bias, split, index)


def _output(attention: ir.Node, heads: int, size: int) -> tuple[ir.Node, ir.Node, list[ir.Value]]:
    """Forward from the op's output to the merge Reshape [.., H*D] and the Wo MatMul. A NaN
    guard Where(IsNaN(y), 0, y) on the way reads y twice: the Where is followed."""
    axis, value, region = -3, attention.outputs[0], []
    for _ in range(MAX_DEPTH):
        region.append(value)
        if value.is_graph_output():
            raise Refused(f"the attention output '{value.name}' is a graph output")
        guards = [u.node for u in _data_readers(value) if u.node.op_type == "IsNaN"]
        main = [u for u in _data_readers(value) if u.node.op_type != "IsNaN"]
        if len(main) != 1 or any([u.node for u in g.outputs[0].uses()] != [main[0].node] for g in guards):
            raise Refused(f"the attention output path '{value.name}' has {len(main) + len(guards)} readers")
        reader, index = main[0].node, main[0].idx
        if _is_merge(reader, heads, size, axis):
            region.append(reader.outputs[0])
            return reader, _single_matmul(reader.outputs[0]), region
        region += [g.outputs[0] for g in guards]
        got = _forward_axis(reader, index, axis, {id(value), *(id(g.outputs[0]) for g in guards)})
        if isinstance(got, str):
            raise Refused(got)
        axis, value = got, reader.outputs[0]
    raise Refused(f"no Reshape merging the heads after '{attention.name}'")


def _is_merge(node: ir.Node, heads: int, size: int, axis: int) -> bool:
    if (node.domain, node.op_type) != ops.RESHAPE or axis != -2:
        return False
    src, out = _dims(node.inputs[0]), _dims(node.outputs[0])
    return bool(src and out and len(out) == len(src) - 1 and src[-2:] == [heads, size] and out[-1] == heads * size)


def _single_matmul(value: ir.Value) -> ir.Node:
    uses = _data_readers(value)
    node = uses[0].node if len(uses) == 1 else None
    if node is None or value.is_graph_output() or (node.domain, node.op_type) != ops.MATMUL or uses[0].idx != 0 \
            or const_array(node.inputs[1]) is None or const_array(node.inputs[1]).ndim != 2:
        raise Refused(f"the merged heads '{value.name}' are not read by one MatMul with a constant weight")
    return node


def site_for(attention: ir.Node) -> HeadSite:
    """The head site of one canonical attention op, or Refused with the reason."""
    heads, size = attention.attributes.get_int("q_num_heads", 0), attention.attributes.get_int("head_size", 0)
    kv = attention.attributes.get_int("kv_num_heads", 0) or heads
    if not heads or not size:
        raise Refused("its heads or head size are unknown")
    if kv != heads:
        raise Refused(f"grouped-query attention ({heads} query heads, {kv} K/V heads): pruning whole groups is not built")
    if heads < 2:
        raise Refused("it has one head")
    projections, targets, region = [], [], []
    for role, index in (("Q", 0), ("K", 1), ("V", 2)):
        splits, values, on_path = _trace_input(attention, attention.inputs[index], heads, size)
        _check_path(splits, values, on_path, attention, -3)
        for split in splits:
            source = split.inputs[0]
            if len(_data_readers(source)) != 1 or source.is_graph_output():
                raise Refused(f"the {role} projection '{source.name}' has another reader")
            projections.append(_projection(source, role))
            targets.append((split, split.outputs[0].shape.rank() - 2, 1))
        region += values
    if len({(id(p.matmul), p.index) for p in projections}) != len(projections) or len(projections) != 3:
        raise Refused("its Q, K and V do not each come from one projection of their own")
    bias_axis = None
    if len(attention.inputs) > 3 and attention.inputs[3] is not None:
        bias = attention.inputs[3]
        dims = _dims(bias)
        if dims is None:
            raise Refused(f"its bias '{bias.name}' has an unknown shape")
        if len(dims) >= 3 and dims[-3] != 1:
            if const_array(bias) is None:
                raise Refused(f"its bias '{bias.name}' differs per head and is computed at run time")
            bias_axis = len(dims) - 3
    merge, down, out_region = _output(attention, heads, size)
    targets.append((merge, merge.outputs[0].shape.rank() - 1, size))
    for reshape, position, per_head in targets:
        if blocker := _target_blocker(reshape, position, heads * per_head):
            raise Refused(blocker)
    if const_array(down.inputs[1]).shape[0] != heads * size:
        raise Refused(f"Wo '{down.name}' does not read {heads} x {size} rows")
    return HeadSite(attention, projections, targets, region + out_region, down, heads, size, bias_axis)


def find_heads(graph: ir.Graph) -> tuple[list[HeadSite], dict[str, str]]:
    """(head sites in graph order, {attention node: why its heads cannot be pruned})."""
    sites, refused = [], {}
    for node in graph:
        if not is_canonical(node):
            continue
        try:
            sites.append(site_for(node))
        except Refused as exc:
            refused[node.name or node.op_type] = str(exc)
    return sites, refused
