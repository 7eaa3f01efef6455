"""The basis split: find the Conv/Gemm/MatMul layers it applies to (:mod:`.layers`),
split each weight exactly by SVD into bases and scaling factors (:mod:`.svd`), refit the kept
bases to the data where calibration data is given (:mod:`.reconstruct`, :mod:`.data_aware`),
rewrite the graph into basis/scaling node pairs (:mod:`.rewrite`) and merge consecutive pointwise
linear nodes where that is exact and not costlier (:mod:`.fuse`)."""
