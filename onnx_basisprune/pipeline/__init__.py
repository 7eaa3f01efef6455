"""The jobs that chain the stages: a model prepared once and the result a plan makes of
it (:mod:`.prepared`), basis pruning driven by Taylor importance on calibration data
(:mod:`.calibrated`), double pruning, channels first and then bases (:mod:`.double`), and the
main job that picks between them (:mod:`.job`)."""
