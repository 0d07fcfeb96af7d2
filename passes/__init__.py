"""Built-in pass families. Importing this package registers them."""

from graphopt.passes import activations, attention, attention_scale, batchnorm, cleanup, contrib, keepdims, linear_merges, mixers, norms, portable, precision, prenorm, prune, reparam  # noqa: F401
