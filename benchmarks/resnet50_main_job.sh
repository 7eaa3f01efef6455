#!/bin/sh
# Wall time of the whole main job on a ResNet-50-size model (torchvision resnet50, random weights:
# the time does not depend on them) with N calibration images (uint8, 3xSxS, an .npy), at
# --target-macs 0.7, on a Torch device, cut off after T seconds. Figures: benchmarks/RESNET50.md.
#
#   sh benchmarks/resnet50_main_job.sh N S DEVICE T        e.g. 512 224 cuda 600
#   PY=.venv/bin/python taskset -c 0,1 sh benchmarks/resnet50_main_job.sh 512 224 cpu 600   (2 cores)
set -u
${PY:-python3} - "$1" "$2" <<'PY'
import sys, numpy as np, torch, torchvision
n, size = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
net = torchvision.models.resnet50().eval()
torch.onnx.export(net, (torch.randn(1, 3, size, size),), "/tmp/r50.onnx", dynamo=False, opset_version=17,
                  input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
np.save("/tmp/x.npy", np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8))
PY
start=$(date +%s)
timeout "$4" ${PY:-python3} -m onnx_basisprune /tmp/r50.onnx --calib /tmp/x.npy --target-macs 0.7 --no-bench \
    --device "$3" -o /tmp/r50.pruned.onnx 2>&1 | grep -v "it/s\|batch/s\|node/s" | tail -12
echo "device $3: main job $(( $(date +%s) - start )) s (cut off at $4 s)"
