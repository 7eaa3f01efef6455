"""Build the built-in example: a small VGG-style CNN on scikit-learn's digits.

Everything here runs offline: the data is scikit-learn's bundled ``load_digits``
(1797 grey 8x8 images, 10 classes). The images are upscaled to 32x32 (bilinear),
scaled to [0, 1] and written as 8-bit PNGs; the network is trained on exactly the
pixel values a user gets back from those PNGs (``PIL`` then ``/255``).

Writes, next to this file:
  model.onnx                 input  "input"  [batch, 1, 32, 32] float32 in [0, 1]
                             output "logits" [batch, 10]
  calib/<digit>/<i>.png      CALIB_PER_CLASS images per class from the train split
  heldout/<digit>/<i>.png    the whole test split
and prints the onnxruntime accuracy on heldout/ (read back from disk).

Regenerate with:  .venv/bin/python examples/digits/train.py
"""

from __future__ import annotations

import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 0
SIZE = 32
CALIB_PER_CLASS = 40
EPOCHS = 12
BATCH = 64
TARGET_ACC = 0.97


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def make_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 [N, 32, 32] (what the PNGs will hold) plus labels."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    u8 = np.clip(np.rint(x[:, 0].numpy() * 255.0), 0, 255).astype(np.uint8)
    return u8, digits.target.astype(np.int64)


def conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 32), *conv_bn(32, 32), nn.MaxPool2d(2),
            *conv_bn(32, 64), *conv_bn(64, 64), nn.MaxPool2d(2),
            *conv_bn(64, 128),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels (zero fill)."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def write_pngs(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    if root.exists():
        shutil.rmtree(root)
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(root / str(labels[i]) / f"{i:04d}.png", optimize=True)


def load_png_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load PNGs exactly as a user would: sorted class folders, PIL, /255."""
    xs, ys = [], []
    for label, cls in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        for f in sorted((root / cls).glob("*.png")):
            xs.append(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0)
            ys.append(label)
    return np.stack(xs)[:, None], np.array(ys)


def main() -> None:
    seed_everything()
    images, labels = make_images()
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.3, stratify=labels, random_state=SEED)

    # Training tensors carry exactly the PNG pixel values (uint8 / 255).
    x_all = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    y_all = torch.from_numpy(labels)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_te, y_te = x_all[test_idx], y_all[test_idx]

    model = DigitsNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DigitsNet: {n_params:,} parameters; train {len(train_idx)}, test {len(test_idx)}")

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, epochs=EPOCHS, steps_per_epoch=(len(train_idx) + BATCH - 1) // BATCH
    )
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for s in range(0, len(perm), BATCH):
            b = perm[s:s + BATCH]
            xb = random_shift(x_tr[b], gen)
            loss = F.cross_entropy(model(xb), y_tr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        acc = accuracy(model, x_te, y_te)
        print(f"epoch {epoch + 1:2d}  loss {total / len(perm):.4f}  test acc {acc:.4f}  "
              f"({time.perf_counter() - t0:.1f}s)")
    train_s = time.perf_counter() - t0
    acc = accuracy(model, x_te, y_te)
    if acc < TARGET_ACC:
        raise SystemExit(f"test accuracy {acc:.4f} < {TARGET_ACC}; not exporting")
    print(f"training took {train_s:.1f}s")

    # Export in inference mode with BatchNorm kept as BatchNormalization nodes, so the
    # pruner has something to fold. The legacy exporter's TrainingMode.EVAL always runs
    # an eval peephole pass that fuses Conv+BN; TrainingMode.PRESERVE on a model in
    # eval() mode exports the same inference graph (training_mode=0) without that pass.
    model_path = HERE / "model.onnx"
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notices
        torch.onnx.export(
            model, x_te[:1], str(model_path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    m = onnx.load(str(model_path))
    onnx.checker.check_model(m, full_check=True)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print("exported ops:", dict(sorted(ops.items())))
    assert ops.get("BatchNormalization") == 5, "BatchNorm was folded by the exporter"

    # Images: calibration from the train split, the whole test split as heldout.
    rng = np.random.default_rng(SEED)
    calib_idx = np.concatenate([
        np.sort(rng.choice(train_idx[labels[train_idx] == c], CALIB_PER_CLASS, replace=False))
        for c in range(10)
    ])
    write_pngs(HERE / "calib", images, labels, calib_idx)
    write_pngs(HERE / "heldout", images, labels, np.sort(test_idx))

    # Check as a user would: PNGs from disk, /255, onnxruntime.
    x_h, y_h = load_png_folder(HERE / "heldout")
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x_h})[0]
    ort_acc = float((logits.argmax(1) == y_h).mean())
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_h)).numpy()
    print(f"max |onnxruntime - torch| logits: {np.abs(logits - torch_logits).max():.2e}")
    print(f"onnxruntime accuracy on heldout/ ({len(y_h)} PNGs): {ort_acc:.4f}")


if __name__ == "__main__":
    main()
