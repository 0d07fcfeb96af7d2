"""Passes and rules.

A `Pass` is a model-to-model transform that mutates an onnx_ir model in place
and returns how many rewrites each of its rules made. A `Rule` is one
mathematical identity written with onnxscript's pattern API: `pattern`,
`check` (fails once per numbered precondition, with a reason), `rewrite`.
A `RulePass` applies its rules to a fixpoint and counts what fired; onnxscript
tags every node a rule creates with the rule's name in its metadata.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import enum
import logging
from typing import Any, ClassVar

from graphopt import functions
from graphopt.ir import (MatchingTracer, MatchStatus, NodeOutputPattern, RewriteRuleClassBase, RewriteRuleSet,
                         StringConstantPattern, common_passes, ir)
from graphopt.shapes import infer_shapes

logger = logging.getLogger(__name__)

RULE_TAG = "graphopt.rule"  # node metadata naming the structural rule that made it (onnxscript tags its rules' nodes itself)


class PassKind(str, enum.Enum):
    EXACT = "exact"  # computes the same function to float tolerance; rolled back if it diverges
    APPROXIMATE = "approximate"  # changes the function; always reported with fidelity numbers
    LOWERING = "lowering"  # targets one backend or execution provider

    def __str__(self) -> str:
        return self.value


class Pass(abc.ABC):
    """Base class: subclasses set `name` (kebab-case), `kind`, and a docstring whose first line is the summary."""

    name: ClassVar[str]
    kind: ClassVar[PassKind]
    requires_shapes: ClassVar[bool] = False

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def __call__(self, model: ir.Model) -> dict[str, int]:
        """Prepare what the pass declares it needs (shapes), then run it."""
        if self.requires_shapes:
            infer_shapes(model)
        counts = self.run(model)
        if any(counts.values()):
            functions.ensure(model)  # definitions (and the opset import) for any graphopt op it emitted
        return counts

    @abc.abstractmethod
    def run(self, model: ir.Model) -> dict[str, int]:
        """Mutate `model` in place; return rewrites per rule (or per step). Call the pass, not `run`."""

    def near_misses(self, model: ir.Model) -> list[str]:
        """Why rules missed, for `--explain`: `explain` on a prepared copy (shapes inferred
        when the pass needs them, exactly as `__call__` prepares before `run`)."""
        work = model.clone()
        if self.requires_shapes:
            infer_shapes(work)
        return self.explain(work)

    def explain(self, model: ir.Model) -> list[str]:
        """Near misses on an already prepared model; may mutate it. Call `near_misses`."""
        return []


class Rule(RewriteRuleClassBase):
    """Base class for rewrite rules. The docstring is the contract:

    the math of the identity, then numbered preconditions that `check` verifies
    in order, failing with `MatchResult().fail(reason, value_or_node)`.
    """

    commute: ClassVar[bool] = False
    # Op types every match contains (e.g. Erf for GELU's erf form): a graph without one of them
    # cannot match, so the rule (and its commuted variants, often hundreds) is not tried there.
    requires_ops: ClassVar[tuple[str, ...]] = ()
    # Parameterized variants of the same identity (e.g. association orders of a
    # product); each dict becomes one onnxscript rule. Counts add up per class.
    variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, **params: Any) -> None:
        super().__init__(name=type(self).__name__)
        for key, value in params.items():
            setattr(self, key, value)


class RulePass(Pass):
    """A pass made of rules, applied until none fires (at most `max_rounds` rounds)."""

    rules: ClassVar[tuple[type[Rule], ...]]
    max_rounds: ClassVar[int] = 8

    @staticmethod
    @functools.cache
    def _rule_set(rule_cls: type[Rule]) -> RewriteRuleSet:
        """Built once per process: commuting a pattern copies it 2^k times (k commutative nodes).
        Safe to share because graphopt rules keep no per-model state. Each rule is anchored
        (`_Anchors`): tried only at nodes where a match can be rooted."""
        rule_set = RewriteRuleSet([rule_cls.rule(**v) for v in rule_cls.variants], commute=rule_cls.commute)
        rule_set.anchors = _Anchors(rule_set.rules)
        return rule_set

    def run(self, model: ir.Model) -> dict[str, int]:
        counts = {rule.__name__: 0 for rule in self.rules}
        present = _op_types(model)
        rules = [rule for rule in self.rules if all(op in present for op in rule.requires_ops)]
        for _ in range(self.max_rounds):
            fired = 0
            for rule in rules:
                rule_set = self._rule_set(rule)
                with rule_set.anchors.on(model) as anywhere:
                    n = rule_set.apply_to_model(model) if anywhere else 0
                counts[rule.__name__] += n
                fired += n
            if not fired:
                break
        if any(counts.values()):
            common_passes.RemoveUnusedNodesPass()(model)  # what the rewrites orphaned (Constants, old weights)
        return counts

    def explain(self, model: ir.Model) -> list[str]:
        """Per rule and root node, the best attempt that got somewhere: every failed
        precondition, and pattern misses that matched more than their first node (one
        line, however many commuted variants of the rule tried it)."""
        best: dict[tuple[str, int], tuple[int, str]] = {}
        for rule in self.rules:
            tracer = MatchingTracer()
            rule_set = self._rule_set(rule)
            with rule_set.anchors.on(model) as anywhere:
                if anywhere:
                    rule_set.apply_to_model(model, tracer=tracer)
            for infos in tracer.best_matches_map.values():
                for info in infos:
                    matched = len(info.match_result.nodes)
                    if info.status == MatchStatus.SUCCESS or (info.status == MatchStatus.NO_MATCH and matched < 2):
                        continue
                    key, score = (rule.__name__, id(info.root_node)), info.score()
                    if key not in best or score > best[key][0]:
                        best[key] = (score, _near_miss_line(rule.__name__, info))
        return [line for _, line in sorted(best.values(), key=lambda x: -x[0])]



class _Anchors:
    """Where each rule of a rule set can match, so that matching costs what the graph holds,
    not rules x nodes (a commuted pattern has hundreds of copies; each copy tried at every
    node made fuse-activations take 48 s on a 3,600-node model).

    A single-output pattern matches at its output node, walking producers from there, so a
    match's root is a node of the pattern's output op type lying at most (pattern nodes - 1)
    consumer steps below a node of each op type in the pattern. The rarest such op type in
    the model is the anchor; the roots are the nodes that close to one of its nodes. Nodes a
    rewrite adds during a round are not roots until the next round (a RulePass runs rounds
    until none fires). Patterns with several outputs, or an op type given by a variable, are
    tried everywhere, as onnxscript does."""

    def __init__(self, rules) -> None:
        self.rules = rules
        self.roots: dict[int, frozenset | None] = {}  # id(rule) -> the nodes it may be rooted at (None: any)
        for rule in rules:
            rule.try_rewrite = self._anchored(rule, rule.try_rewrite)

    def _anchored(self, rule, try_rewrite):
        def anchored(model, graph, node, **kwargs):
            roots = self.roots.get(id(rule))
            if roots is not None and node not in roots:
                return None
            return try_rewrite(model, graph, node, **kwargs)
        return anchored

    @contextlib.contextmanager
    def on(self, model: ir.Model):
        """Anchor the rules on `model` for the duration; yields whether any rule can match."""
        nodes = [*ir.traversal.RecursiveGraphIterator(model.graph), *(n for f in model.functions.values() for n in f)]
        by_op: dict[tuple[str, str], list] = {}
        for node in nodes:
            by_op.setdefault((_domain(node.domain), node.op_type), []).append(node)
        found: dict[tuple, frozenset] = {}
        for rule in self.rules:
            key = _anchor_key(rule, by_op)
            if key is not None and key not in found:
                anchor, depth, root = key
                found[key] = _below(by_op.get(anchor, ()), depth) & frozenset(by_op.get(root, ()))
            self.roots[id(rule)] = None if key is None else found[key]
        try:
            yield any(roots is None or roots for roots in self.roots.values())  # False: no rule can match anywhere
        finally:
            self.roots.clear()


def _anchor_key(rule, by_op) -> tuple | None:
    """(anchor op, depth, root op) of a rule's pattern, or None when it cannot be anchored."""
    pattern = rule._target_pattern
    if len(pattern.output_nodes) != 1:
        return None
    root = pattern.output_nodes[0]
    ops, frontier = [], [root]
    while frontier:  # every node a match must contain: not those under an alternative (OrValue)
        node = frontier.pop()
        if not isinstance(node.domain, StringConstantPattern) or not isinstance(node.op, StringConstantPattern):
            return None
        ops.append((_domain(node.domain.value()), node.op.value()))
        frontier += [v.producer() for v in node.inputs if isinstance(v, NodeOutputPattern)]
    anchor = min(set(ops), key=lambda op: len(by_op.get(op, ())))
    return anchor, len(pattern._nodes), ops[0]


def _domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def _below(starts, depth: int) -> frozenset:
    """`starts` and every node at most `depth` consumer steps below one of them."""
    seen, frontier = set(starts), list(starts)
    for _ in range(depth):
        frontier = [user for node in frontier for out in node.outputs for user, _ in out.uses() if user not in seen]
        seen.update(frontier)
    return frozenset(seen)


def _op_types(model: ir.Model) -> set[str]:
    """Op types in the graph, its subgraphs and the model-local functions."""
    found = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    return found | {n.op_type for f in model.functions.values() for n in f}


def _near_miss_line(rule: str, info) -> str:
    node = info.root_node
    where = f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"
    reason = info.match_result.reason or "pattern did not match"
    culprits = list(dict.fromkeys(getattr(x, "name", None) for x in info.match_result.failure_nodes_and_values))
    at = f" at {', '.join(repr(c) for c in culprits if c)}" if any(culprits) else ""
    return f"{rule}: {where}: {info.status.name.lower().replace('_', ' ')}: {reason}{at}"
