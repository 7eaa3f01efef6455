"""onnx-basisprune: shrink exported ONNX CNNs by basis scaling (SVD split + basis pruning)."""

from .api import PruneResult, decompose, inspect, prepare, prune
from .errors import BasisPruneError

__all__ = ["BasisPruneError", "PruneResult", "decompose", "inspect", "prepare", "prune"]
__version__ = "0.1.0"
