"""Whole-channel pruning (the first half of double pruning): find which channels of
which tensors must go together (:mod:`.analysis`, a dependency graph on ONNX values, built by a
graph walk (:mod:`.walk`) with one handler per op (:mod:`.ops`), shape tracking
(:mod:`.shape_values`), gate sites (:mod:`.sites`) and a cost model (:mod:`.cost`)), choose the
groups to remove under a target (:mod:`.select`), remove them exactly (:mod:`.rewrite`) and refit
the layers that lose input channels from calibration moments (:mod:`.refit`)."""
