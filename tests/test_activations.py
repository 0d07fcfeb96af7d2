"""Activation fusion: erf and tanh GELU in every association order, and SiLU."""

from __future__ import annotations

import onnx.parser
import pytest

import graphopt
from rule_testing import apply, assert_equivalent, assert_explained, header, ops_of


def product(association: str, cdf: str) -> str:
    """x * cdf * 0.5 in the association orders exporters emit."""
    half = "half = Constant<value = float {0.5}>()"
    return {
        "x-first": f"{half}\n    xc = Mul(x, {cdf})\n    y = Mul(xc, half)",
        "half-first": f"{half}\n    hx = Mul(half, x)\n    y = Mul(hx, {cdf})",
        "cdf-half": f"{half}\n    ch = Mul({cdf}, half)\n    y = Mul(x, ch)",
    }[association]


def gelu_erf(association="x-first", scale="div", root="1.4142135", opset=21, dtype="float"):
    inner = f"r = Constant<value = float {{{root}}}>()\n    s = Div(x, r)" if scale == "div" else \
        "r = Constant<value = float {0.70710678}>()\n    s = Mul(x, r)"
    return header(opset) + f"""
g ({dtype}[4, 8] x) => ({dtype}[4, 8] y) {{
    {inner}
    e = Erf(s)
    one = Constant<value = float {{1.0}}>()
    cdf = Add(e, one)
    {product(association, "cdf")}
}}"""


def gelu_tanh(association="half-first", cube="pow", opset=21):
    k = "k = Constant<value = float {0.044715}>()"
    cubed = {
        "pow": f"three = Constant<value = float {{3.0}}>()\n    x3 = Pow(x, three)\n    {k}\n    kx3 = Mul(x3, k)",
        "mul": f"x2 = Mul(x, x)\n    x3 = Mul(x2, x)\n    {k}\n    kx3 = Mul(x3, k)",
        # jax2tf (magika): x * (x * (k * x))
        "nested": f"{k}\n    kx = Mul(k, x)\n    kx2 = Mul(x, kx)\n    kx3 = Mul(x, kx2)",
    }[cube]
    return header(opset) + f"""
g (float[4, 8] x) => (float[4, 8] y) {{
    {cubed}
    inner = Add(x, kx3)
    c = Constant<value = float {{0.7978845608}}>()
    arg = Mul(c, inner)
    t = Tanh(arg)
    one = Constant<value = float {{1.0}}>()
    cdf = Add(one, t)
    {product(association, "cdf")}
}}"""


ASSOCIATIONS = ["x-first", "half-first", "cdf-half"]


@pytest.mark.parametrize("association", ASSOCIATIONS)
@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("opset, domain", [(21, ""), (17, "graphopt"), (13, "graphopt")])
def test_fuse_gelu(association, scale, opset, domain):
    original = graphopt.load(onnx.parser.parse_model(gelu_erf(association, scale, opset=opset)))
    model, counts = apply("fuse-activations", original)
    assert counts == {"FuseGelu": 1, "FuseGeluTanh": 0, "FuseSiLU": 0, "FuseSoftmax": 0}
    (node,) = list(model.graph)
    assert (node.domain, node.op_type) == (domain, "Gelu")
    assert_equivalent(original, model)


@pytest.mark.parametrize("association", ASSOCIATIONS)
@pytest.mark.parametrize("cube", ["pow", "mul", "nested"])
@pytest.mark.parametrize("opset, op", [(21, "Gelu"), (17, "GeluTanh")])
def test_fuse_gelu_tanh(association, cube, opset, op):
    original = graphopt.load(onnx.parser.parse_model(gelu_tanh(association, cube, opset)))
    model, counts = apply("fuse-activations", original)
    assert counts == {"FuseGelu": 0, "FuseGeluTanh": 1, "FuseSiLU": 0, "FuseSoftmax": 0}
    (node,) = list(model.graph)
    assert node.op_type == op and (op != "Gelu" or node.attributes.get_string("approximate") == "tanh")
    assert_equivalent(original, model)


def test_fuse_silu():
    original = graphopt.load(onnx.parser.parse_model(header(21) + "g (float[4, 8] x) => (float[4, 8] y) { s = Sigmoid(x)\n y = Mul(s, x) }"))
    model, counts = apply("fuse-activations", original)
    assert counts == {"FuseGelu": 0, "FuseGeluTanh": 0, "FuseSiLU": 1, "FuseSoftmax": 0}
    assert ops_of(model) == {"SiLU": 1}
    assert_equivalent(original, model)


def test_activation_negatives():
    # FuseGelu 1: a constant that is not sqrt(2) (a hand-rounded 1.41 changes the function).
    model = graphopt.load(onnx.parser.parse_model(gelu_erf(root="1.41")))
    assert apply("fuse-activations", model)[1]["FuseGelu"] == 0
    assert_explained("fuse-activations", model, "FuseGelu", "root2 is 1.40999")
    # FuseGeluTanh 1: a different cubic coefficient.
    model = graphopt.load(onnx.parser.parse_model(gelu_tanh().replace("0.044715", "0.05")))
    assert apply("fuse-activations", model)[1]["FuseGeluTanh"] == 0
    assert_explained("fuse-activations", model, "FuseGeluTanh", "k is 0.05")
    # FuseGelu 2 / FuseSiLU 1: fp16 below opset 15 cannot call a graphopt function.
    text = header(13) + "g (float16[4, 8] x) => (float16[4, 8] y) { s = Sigmoid(x)\n y = Mul(x, s) }"
    model = graphopt.load(onnx.parser.parse_model(text))
    assert apply("fuse-activations", model)[1]["FuseSiLU"] == 0
    assert_explained("fuse-activations", model, "FuseSiLU", "float32-only")
    # SiLU needs the same x on both sides.
    text = header(21) + "g (float[4, 8] x, float[4, 8] z) => (float[4, 8] y) { s = Sigmoid(z)\n y = Mul(x, s) }"
    assert apply("fuse-activations", graphopt.load(onnx.parser.parse_model(text)))[1]["FuseSiLU"] == 0
