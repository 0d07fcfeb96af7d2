"""graphopt's own op vocabulary: the high-level ops that passes emit and lowerings consume,
each with its reference body next to its name (norms, activations, canonical attention).
Importing this package registers them in graphopt.functions.LIBRARY."""

from graphopt.library import activations, attention, norms  # noqa: F401
