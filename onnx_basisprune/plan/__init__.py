"""The plan: how many bases each layer keeps. Pure rank choice from scores, the cost
model and a target (:mod:`.ranks`), data-free plans by singular-value energy or under a
params/MACs/latency budget (:mod:`.plans`), and the held-out quality evaluation with the search
for the strongest pruning within a quality budget (:mod:`.search`)."""
