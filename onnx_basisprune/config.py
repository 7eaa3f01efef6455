"""Every option of a pruning run in one frozen value: :func:`onnx_basisprune.prune` builds it
from its keywords, the CLI from its arguments, and every stage reads it (nothing below the CLI
sees argparse).

The defaults are the tool's: with calibration data the strongest basis pruning within
``max_drop=1`` point of held-out quality, Fisher allocation and the sequential data-aware fit;
without, singular-value energy 0.99 per layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import BasisPruneError

DataSource = str | os.PathLike | np.ndarray | Mapping[str, np.ndarray]
"""Calibration or evaluation data: an image folder (class subfolders give labels), an .npy/.npz
file, one array (the model's single input) or arrays by input name (``labels`` / ``y`` for
labels)."""

DEFAULT_CRITERION = "fisher"
CRITERIA = ("fisher", "energy", "taylor", "taylor-sq")
FITS = ("sequential", "independent")
CHANNEL_CRITERIA = ("taylor", "taylor-sq")
DEFAULT_MAX_DROP = 1.0


@dataclass(frozen=True)
class Target:
    """What the pruning aims at: ``max-drop`` (points of held-out quality), or the fraction of the
    original model's ``params``, ``macs`` or ``latency`` that remains."""

    kind: str
    value: float


@dataclass(frozen=True)
class Preprocessing:
    """Overrides of the image preprocessing inferred from the model input (None: inferred)."""

    resize: int | None = None  # short side, pixels
    crop: int | None = None  # centre crop, pixels
    scale: float | None = None  # pixel multiplier (default 1/255)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False


@dataclass(frozen=True)
class PruneConfig:
    """The options of one run (see :func:`onnx_basisprune.prune` for what each means)."""

    calib: DataSource | None = None
    eval: DataSource | None = None
    labels: str | os.PathLike | None = None
    unlabeled: bool = False
    holdout: float = 0.3
    limit: int | None = None
    # what to aim at: at most one of these
    energy: float | None = None
    target_params: float | None = None
    target_macs: float | None = None
    target_latency: float | None = None
    max_drop: float | None = None
    full_rank: bool = False
    # how
    double: bool = False
    criterion: str | None = None  # None: fisher with calibration data
    fit: str = "sequential"
    tune: bool = False
    channel_criterion: str | None = None
    provider: str = "cpu"
    latency_aware: bool | None = None  # None: on for a quality or latency target with calibration data
    latency_batches: tuple[int, ...] = (1, 8)
    time_candidates: bool = True  # time the models the quality search evaluated
    check_speed: bool = True  # time the final model against the original (and recompose what is not faster)
    input_shapes: Mapping[str, Sequence[int]] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    batch_size: int = 32
    device: str | None = None  # Torch device; None: cuda when available
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        aims = {"energy": self.energy, "target_params": self.target_params, "target_macs": self.target_macs,
                "target_latency": self.target_latency, "max_drop": self.max_drop, "full_rank": self.full_rank or None}
        given = [name for name, value in aims.items() if value is not None]
        if len(given) > 1:
            raise BasisPruneError(f"give one of energy, target_params, target_macs, target_latency, max_drop, full_rank "
                                  f"(got {', '.join(given)})")
        for name in ("energy", "target_params", "target_macs", "target_latency"):
            value = aims[name]
            if value is not None and not 0.0 < value <= 1.0:
                raise BasisPruneError(f"{name} must be in (0, 1], got {value}")
        if self.max_drop is not None and self.max_drop < 0:
            raise BasisPruneError(f"max_drop must be >= 0, got {self.max_drop}")
        if not 0.0 < self.holdout < 1.0:
            raise BasisPruneError(f"holdout must be in (0, 1), got {self.holdout}")
        for name, value, choices in (("criterion", self.criterion, CRITERIA), ("fit", self.fit, FITS),
                                     ("channel_criterion", self.channel_criterion, CHANNEL_CRITERIA),
                                     ("provider", self.provider, ("cpu", "cuda"))):
            if value is not None and value not in choices:
                raise BasisPruneError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not self.latency_batches or min(self.latency_batches) < 1:
            raise BasisPruneError(f"latency batch sizes must be >= 1, got {self.latency_batches}")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise BasisPruneError("batch_size and limit must be >= 1")
        if self.calib is not None and (self.full_rank or self.energy is not None):
            raise BasisPruneError("--full-rank and --energy are data-free: drop them or --calib")
        if self.calib is None and (self.eval is not None or self.max_drop is not None or self.double or self.unlabeled):
            raise BasisPruneError("--max-drop, --eval, --unlabeled and --double need calibration data (--calib)")
        if self.allocation == "fisher" and self.fit != "sequential":
            raise BasisPruneError("--criterion fisher ranks the bases of the data-aware split: it needs --fit sequential")

    @property
    def allocation(self) -> str:
        """The criterion that allocates ranks (``criterion``, else the default)."""
        return self.criterion or DEFAULT_CRITERION

    def measures_latency(self, target: Target) -> bool:
        """Whether layers are timed on the provider to decide where a split pays: as asked, else
        for a quality (``max-drop``) or latency target; a params or MACs budget asks for size."""
        return self.latency_aware if self.latency_aware is not None else target.kind in ("max-drop", "latency")

    def target(self) -> Target:
        """The target of the calibrated job (``max-drop`` 1 point unless a budget is given)."""
        for kind, value in (("params", self.target_params), ("macs", self.target_macs), ("latency", self.target_latency)):
            if value is not None:
                return Target(kind, value)
        return Target("max-drop", DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop)
