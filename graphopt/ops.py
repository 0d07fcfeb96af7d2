"""Operator identities: domains and op types graphopt refers to by name.

Op-type strings live here (and inside rewrite patterns) and nowhere else.
"""

from __future__ import annotations

from typing import NamedTuple

ONNX_DOMAIN = ""
ONNX_DOMAIN_ALIASES = ("", "ai.onnx")
ONNX_ML_DOMAIN = "ai.onnx.ml"
ONNX_TRAINING_DOMAIN = "ai.onnx.preview.training"
ORT_CONTRIB_DOMAIN = "com.microsoft"
GRAPHOPT_DOMAIN = "graphopt"

# Domains whose op schemas ship with the `onnx` package and can be checked there.
SCHEMA_DOMAINS = (*ONNX_DOMAIN_ALIASES, ONNX_ML_DOMAIN, ONNX_TRAINING_DOMAIN)
# Domains onnxruntime implements without schemas in `onnx`.
RUNTIME_DOMAINS = (ORT_CONTRIB_DOMAIN,)
# Who runs the ops of a non-standard domain (the portable output's note names them).
RUNTIMES = {ORT_CONTRIB_DOMAIN: "onnxruntime only"}


class OpId(NamedTuple):
    domain: str
    op_type: str

    def __str__(self) -> str:
        return self.op_type if self.domain in ONNX_DOMAIN_ALIASES else f"{self.domain}::{self.op_type}"


GATHER = OpId(ONNX_DOMAIN, "Gather")
CONSTANT = OpId(ONNX_DOMAIN, "Constant")
CONSTANT_OF_SHAPE = OpId(ONNX_DOMAIN, "ConstantOfShape")
MATMUL = OpId(ONNX_DOMAIN, "MatMul")
ADD = OpId(ONNX_DOMAIN, "Add")
SPLIT = OpId(ONNX_DOMAIN, "Split")
TRANSPOSE = OpId(ONNX_DOMAIN, "Transpose")
RESHAPE = OpId(ONNX_DOMAIN, "Reshape")
CONCAT = OpId(ONNX_DOMAIN, "Concat")
DEQUANTIZE_LINEAR = OpId(ONNX_DOMAIN, "DequantizeLinear")
QUANTIZE_LINEAR = OpId(ONNX_DOMAIN, "QuantizeLinear")
DYNAMIC_QUANTIZE_LINEAR = OpId(ONNX_DOMAIN, "DynamicQuantizeLinear")
MATMUL_NBITS = OpId(ORT_CONTRIB_DOMAIN, "MatMulNBits")

# Readers that see only a tensor's shape: rewrites that change values but not shapes can ignore them.
SHAPE_ONLY_READERS = frozenset(OpId(ONNX_DOMAIN, name) for name in ("Shape", "Size"))

# Ops whose outputs change from run to run: never folded, never merged by CSE,
# and compared by shape only.
NONDETERMINISTIC = frozenset(
    OpId(ONNX_DOMAIN, name)
    for name in ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")
)

# Reductions with `keepdims` (axes as attribute below opset 18, as input from 18; ReduceSum from 13).
REDUCTIONS = frozenset(
    OpId(ONNX_DOMAIN, name)
    for name in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
                 "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")
)

# Elementwise ops with numpy broadcasting: each output element depends on the same position
# of its inputs only, so inserting unit axes into every input inserts them into the output.
ELEMENTWISE = frozenset(
    OpId(ONNX_DOMAIN, name)
    for name in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp",
                 "Log", "Relu", "Sigmoid", "Tanh", "Erf", "Cast", "Identity", "Clip", "Where", "Equal", "Less",
                 "Greater", "Not", "Floor", "Ceil")
)


def normalize_domain(domain: str) -> str:
    return ONNX_DOMAIN if domain in ONNX_DOMAIN_ALIASES else domain

# Ops a bf16 / fp16 graph keeps in float32 (passes/precision/half.py): they accumulate over many
# terms (norms, softmax, reductions), or overflow or lose range in 16 bits (exp, pow, the
# reciprocal square root), or take float32-only inputs (Resize's scales).
KEEP_FLOAT32 = frozenset(
    OpId(ONNX_DOMAIN, name)
    for name in ("Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization", "BatchNormalization",
                 "InstanceNormalization", "GroupNormalization", "LpNormalization", "MeanVarianceNormalization",
                 "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                 "ReduceLogSumExp", "ReduceProd", "CumSum", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Range",
                 "Resize", "Upsample", "EyeLike", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
) | NONDETERMINISTIC
