"""The attention family: detection of every exported form of scaled-dot-product attention
(`detect`), the causal/padding classification of its masks (`masks`), and `fuse-attention`
(`fuse`), which writes each site as the canonical op of graphopt/library/attention.py."""

from graphopt.passes.attention import detect, fuse, masks  # noqa: F401
from graphopt.registry import register_analysis

register_analysis("attention", lambda graph: [site.to_dict() for site in detect.find_attention(graph)])
