"""Built-in pass families. Importing this package registers them."""

from graphopt.passes import activations, cleanup, linear, norms, reparam  # noqa: F401
