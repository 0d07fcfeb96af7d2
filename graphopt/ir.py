"""The one place that imports onnx_ir and onnxscript's rewriter API.

Everything else in graphopt imports the IR from here, so an upstream rename
is fixed in one file.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir import passes as ir_passes
from onnx_ir.passes import common as common_passes
from onnx_ir.passes.common._c_api_utils import call_onnx_api as onnx_api_call  # strips weights around onnx C API calls
from onnxscript import optimizer as onnxscript_optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter._pattern_ir import NodeOutputPattern, StringConstantPattern  # pattern internals (rewrite._Anchors)
from onnxscript.rewriter.pattern import (
    MatchingTracer,
    MatchResult,
    MatchStatus,
    RewriteRuleClassBase,
    RewriteRuleSet,
)

__all__ = [
    "ir",
    "ir_passes",
    "common_passes",
    "onnx_api_call",
    "onnxscript_optimizer",
    "pattern",
    "NodeOutputPattern",
    "StringConstantPattern",
    "MatchingTracer",
    "MatchResult",
    "MatchStatus",
    "RewriteRuleClassBase",
    "RewriteRuleSet",
]
