"""Measured speed on onnxruntime: trustworthy latency comparison of whole models
(:mod:`.bench`), per-layer latency tables that let plans follow real time instead of MACs
(:mod:`.latency`), and the final check that a pruned model is handed over as faster only when it
measured faster (:mod:`.speed_check`)."""
