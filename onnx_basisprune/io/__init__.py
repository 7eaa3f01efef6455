"""The model in and out: load and save ONNX files safely (:mod:`.model_io`), normalise
them so every later stage sees one form (:mod:`.normalize`), infer concrete shapes at batch 1
(:mod:`.shapes`), count parameters and MACs (:mod:`.cost`), and check every written model with
onnx.checker, onnxruntime and, for an exact rewrite, against its reference (:mod:`.verify`)."""
