"""mupscale: exact μP widening of trained checkpoints (weights, optimizer state, hyper-parameters)."""

__version__ = "0.1.0"
