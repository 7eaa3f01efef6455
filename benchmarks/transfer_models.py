"""Build the benchmark's transfer-learning models: pretrained CNNs fine-tuned on a small domain.

    python benchmarks/transfer_models.py [--out DIR] [--data DIR] [--shared DIR]
                                         [--only cifar10|hymenoptera|fashion-mnist] [--force] [--epochs N]

Writes to ``--out`` (default ``<repo>/build/benchmarks/models``):

* ``mobilenet_v2_cifar10.onnx``: input [N,3,96,96]. torchvision MobileNetV2 ``IMAGENET1K_V1``,
  classifier replaced by Linear(1280, 10), all layers fine-tuned on the 10,000 CIFAR-10 train
  PNGs of ``../shared`` upscaled 32 -> 110 (PIL bilinear), random 96 px crop + horizontal flip,
  ImageNet mean/std; SGD + Nesterov, cosine learning rate.
  Accuracy on all 10,000 test images with onnxruntime, preprocessed by onnx-basisprune's own
  default loader (resize 32 -> 110, centre crop 96, /255, ImageNet mean/std): as in training, so
  ``python -m onnx_basisprune MODEL --calib .../cifar10/train --eval .../cifar10/test`` needs no
  preprocessing options.
* ``mobilenet_v2_hymenoptera.onnx``: input [N,3,224,224], ants/bees (Linear(1280, 2)), standard
  torchvision recipe (train RandomResizedCrop(224) + flip; eval Resize(256) + CenterCrop(224)),
  last blocks + classifier fine-tuned. Accuracy on the 153 val images with onnxruntime and the
  tool's default loader (which is Resize(256) + CenterCrop(224) for a 224 input).
* ``resnet56_fashion_mnist.onnx``: input [N,3,32,32]. The CIFAR-10 ResNet-56 of
  ``../shared/models/resnet56_cifar10.onnx`` (BatchNorm folded into the convolutions; there is no
  PyTorch file) rebuilt in PyTorch by ``benchmarks/baselines.py``'s ``cifar_resnet_from_onnx`` and
  checked against onnxruntime on Fashion-MNIST images, classifier re-initialised as Linear(64, 10),
  all layers fine-tuned (conv weights and their folded-BatchNorm biases; there is no BatchNorm
  left) on the 10,000-image train folder below: grey 28x28 -> RGB -> 32x32 (PIL bilinear, exactly
  the tool's default loader for this input), random crop (zero padding 2 at 32 px) + horizontal
  flip, /255, ImageNet mean/std; SGD + Nesterov, cosine learning rate, gradients clipped to norm 1
  (without BatchNorm, unclipped SGD diverged). Accuracy on all 10,000 test images with onnxruntime and the
  tool's default loader. Exported with the original's option-A shortcut
  (``F.pad(x[:, :, ::2, ::2])`` on channels: Slice + Pad, as in the shared model), so
  ``cifar_resnet_from_onnx`` rebuilds it too (checked).
* ``<name>.pth``: the fine-tuned PyTorch state_dict of each MobileNetV2 model
  (``torchvision.models.mobilenet_v2`` with ``classifier[1] = Linear(1280, classes)``), for baselines
  that prune the PyTorch model. The ResNet-56 state_dict (``baselines.CifarResNet(9)``) is saved as
  ``resnet56_fashion_mnist.state_dict.pth``, not ``<name>.pth``: ``baselines.torch_model_for`` reads
  ``MODEL.pth`` as a MobileNetV2 and rebuilds CIFAR ResNets from the ONNX graph when there is none.
* ``transfer_models.json``: recipe, epochs, resolution, training time, accuracies, versions, date,
  CPU; entries of models that are skipped (already built, no ``--force``) are kept.

and, for Fashion-MNIST, the data as image folders for the tool's loader under ``--data`` (default
``<repo>/build/benchmarks/data``): ``fashion-mnist/{train,test}/<index>_<class>/<n>.png``
(lossless 8-bit grey PNGs, 28x28, ``n`` = position in the idx file, zero-padded; folder names sort
in class-index order), written once from ``../shared/data/fashion-mnist/*-idx?-ubyte.gz``: train =
the first 1,000 images of each class in file order (10,000), test = all 10,000. A split that is
already there and complete (the expected class folders holding exactly the expected files) is
kept; otherwise it is rewritten (into a hidden temporary folder, renamed when done).

Reproducible: fixed seeds, 2 Torch threads, deterministic data order and augmentation (one
``torch.Generator`` per model). Class indices follow the sorted folder names (the
ImageFolder convention, as in onnx-basisprune's loader). Shared assets are read in place.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gzip
import hashlib
import json
import os
import platform
import random
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: use this checkout's loader
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:  # baselines.py: the CIFAR ResNet rebuilt from ONNX
    sys.path.insert(0, str(REPO / "benchmarks"))

from onnx_basisprune.calibration.data import InputSpec, Preprocess, load_calibration  # noqa: E402

THREADS = 2
SEED = 0
DEVICE = torch.device("cpu")  # --device: where the tensor-fed recipes (cifar10) train
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WEIGHTS = "models/mobilenet_v2_imagenet.pth"
RESNET56 = "models/resnet56_cifar10.onnx"
JSON_NAME = "transfer_models.json"
FASHION = "data/fashion-mnist"  # under <shared>: the original idx files
FASHION_IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Folder names: "<index>_<name>", so that sorted names = class-index order (one digit, 10 classes).
FASHION_CLASSES = ("0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat",
                   "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot")
FASHION_PER_CLASS = {"train": 1000, "test": None}  # first N of each class in file order; None = all
FASHION_CROP_PAD = 2  # random-crop zero padding at 32 px
# Gradient clipping (total norm): BatchNorm is folded away, and without it plain SGD diverged
# (NaN within the first epoch at lr 0.02 and at 0.005-0.01 barely learned); clipped, lr 0.05 trains.
FASHION_GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Recipe:
    name: str  # output file stem
    data: str  # data folder: under <shared>/data; for Fashion-MNIST the image folders written under --data
    train_split: str
    eval_split: str
    resolution: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    frozen_blocks: int  # features[:k] frozen (weights and BatchNorm statistics); 0 = all layers trained
    augmentation: str
    eval_resize: int | None  # the tool's default loader for this input: short side resize (None: direct), checked


CIFAR10 = Recipe(
    name="mobilenet_v2_cifar10", data="cifar10", train_split="train", eval_split="test",
    resolution=96, epochs=15, batch_size=64, lr=0.03, weight_decay=4e-5, warmup_epochs=0.5,
    label_smoothing=0.1, frozen_blocks=0,
    augmentation="PIL bilinear resize 32->110 once (the tool's default for a 96 px input: short side 96*256/224, "
                 "then a centre crop); per epoch a random 96 px crop + horizontal flip",
    eval_resize=110)
HYMENOPTERA = Recipe(
    name="mobilenet_v2_hymenoptera", data="hymenoptera", train_split="train", eval_split="val",
    resolution=224, epochs=12, batch_size=16, lr=0.01, weight_decay=4e-5, warmup_epochs=0.0,
    label_smoothing=0.0, frozen_blocks=14,
    augmentation="RandomResizedCrop(224) + RandomHorizontalFlip (torchvision)",
    eval_resize=256)
FASHION_MNIST = Recipe(
    name="resnet56_fashion_mnist", data="fashion-mnist", train_split="train", eval_split="test",
    resolution=32, epochs=3, batch_size=64, lr=0.05, weight_decay=1e-4, warmup_epochs=0.25,
    label_smoothing=0.0, frozen_blocks=0,
    augmentation=(f"grey PNG -> RGB -> PIL bilinear resize 28->32 once (the tool's loader); per epoch random crop 32 "
                  f"of the zero-padded ({FASHION_CROP_PAD} px) image + horizontal flip"),
    eval_resize=None)
RECIPES = {"cifar10": CIFAR10, "hymenoptera": HYMENOPTERA, "fashion-mnist": FASHION_MNIST}


# --------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) with labels = index of the folder in the sorted list."""
    files, labels = [], []
    folders = class_folders(split_dir)
    for label, folder in enumerate(folders):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
                files.append(f)
                labels.append(label)
    if not files:
        raise SystemExit(f"no images under {split_dir}")
    return files, labels, [f.name for f in folders]


def mobilenet_v2(shared: Path, num_classes: int) -> torch.nn.Module:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(shared / WEIGHTS, map_location="cpu", weights_only=True))
    model.classifier[1] = torch.nn.Linear(model.last_channel, num_classes)
    return model


def freeze(model: torch.nn.Module, blocks: int) -> list[torch.nn.Parameter]:
    """Freeze ``features[:blocks]``; return the trainable parameters."""
    for p in model.features[:blocks].parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: torch.nn.Module, frozen_blocks: int) -> None:
    model.train()
    model.features[:frozen_blocks].eval()  # frozen blocks keep their ImageNet BatchNorm statistics


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # BatchNorm and biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=0.9, nesterov=True)
    warmup = recipe.warmup_epochs / recipe.epochs * steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1.0, steps - warmup)
        return 0.5 * (1 + np.cos(np.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- CIFAR-10


def load_upscaled(files: list[Path], size: int) -> torch.Tensor:
    """uint8 N x 3 x size x size, PIL bilinear resize (as onnx-basisprune's loader does: convert to
    RGB, grey images included, then resize)."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, size: int | None = None) -> torch.Tensor:
    """Random ``size`` x ``size`` crop (default: the input size) of the zero-padded batch + random
    horizontal flip, per sample."""
    n, c, height, width = x.shape
    h = w = size or height
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, height + 2 * pad - h + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, width + 2 * pad - w + 1, (n,), generator=gen).tolist()
    flip = torch.rand(n, generator=gen).lt(0.5).tolist()
    out = torch.empty((n, c, h, w), dtype=x.dtype)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def fit_tensors(model: torch.nn.Module, params: list[torch.nn.Parameter], train_mode, x_all: torch.Tensor,
                y_all: torch.Tensor, recipe: Recipe, pad: int, gen: torch.Generator, tag: str,
                clip_grad_norm: float | None = None) -> dict:
    """Train on uint8 images held in memory: per epoch a ``gen`` permutation (the last partial batch
    dropped), per batch :func:`crop_flip` + :func:`normalise`; cross-entropy, SGD (gradients clipped
    to a total norm of ``clip_grad_norm`` when given), LR per step."""
    steps_per_epoch = len(x_all) // recipe.batch_size  # drop the last partial batch
    opt, sched = make_optimizer(params, recipe, steps_per_epoch * recipe.epochs)
    t_train = time.perf_counter()
    for epoch in range(recipe.epochs):
        train_mode()
        order = torch.randperm(len(x_all), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        t_epoch = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            x = normalise(crop_flip(x_all[idx], pad, gen, recipe.resolution)).to(DEVICE)
            y = y_all[idx].to(DEVICE)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            opt.step()
            sched.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
        if not np.isfinite(loss_sum):
            raise SystemExit(f"{tag}: training diverged (loss {loss_sum / total}) in epoch {epoch + 1}")
        log(f"{tag} epoch {epoch + 1}/{recipe.epochs}: loss {loss_sum / total:.3f}, "
            f"train acc {correct / total:.4f}, {time.perf_counter() - t_epoch:.0f}s")
    return {"train_time_s": round(time.perf_counter() - t_train, 1),
            "final_train_accuracy_augmented": round(correct / total, 4)}


def train_cifar10(shared: Path, recipe: Recipe, data_root: Path) -> tuple[torch.nn.Module, dict]:
    gen = seed_everything(SEED)
    files, labels, classes = image_files(data_dir("cifar10", recipe, shared, data_root) / recipe.train_split)
    t0 = time.perf_counter()
    x_all = load_upscaled(files, recipe.eval_resize or recipe.resolution)  # as the loader resizes
    y_all = torch.tensor(labels)
    log(f"cifar10: {len(files)} train images, {len(classes)} classes, upscaled to {x_all.shape[-1]} "
        f"in {time.perf_counter() - t0:.0f}s")
    model = mobilenet_v2(shared, len(classes)).to(DEVICE, memory_format=torch.channels_last)
    params = freeze(model, recipe.frozen_blocks)
    fitted = fit_tensors(model, params, lambda: set_train_mode(model, recipe.frozen_blocks), x_all, y_all,
                         recipe, 0 if recipe.eval_resize else recipe.resolution // 8, gen, "cifar10")
    return model, {"train_images": len(files), "classes": classes, **fitted}


# --------------------------------------------------------------------------- ants / bees


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def train_hymenoptera(shared: Path, recipe: Recipe, data_root: Path) -> tuple[torch.nn.Module, dict]:
    gen = seed_everything(SEED)
    files, labels, classes = image_files(data_dir("hymenoptera", recipe, shared, data_root) / recipe.train_split)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(recipe.resolution),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    # num_workers=0: the transforms draw from Torch's global RNG in a fixed order (seeded above)
    loader = torch.utils.data.DataLoader(FolderDataset(files, labels, transform), batch_size=recipe.batch_size,
                                         shuffle=True, generator=gen, num_workers=0, drop_last=False)
    log(f"hymenoptera: {len(files)} train images, classes {classes}")
    model = mobilenet_v2(shared, len(classes)).to(memory_format=torch.channels_last)
    params = freeze(model, recipe.frozen_blocks)
    opt, sched = make_optimizer(params, recipe, len(loader) * recipe.epochs)
    t_train = time.perf_counter()
    for epoch in range(recipe.epochs):
        set_train_mode(model, recipe.frozen_blocks)
        total, correct, loss_sum = 0, 0, 0.0
        t_epoch = time.perf_counter()
        for x, y in loader:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                h = model.features[:recipe.frozen_blocks](x)
            logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(model.features[recipe.frozen_blocks:](h), 1), 1))
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
        log(f"hymenoptera epoch {epoch + 1}/{recipe.epochs}: loss {loss_sum / total:.3f}, "
            f"train acc {correct / total:.4f}, {time.perf_counter() - t_epoch:.0f}s")
    info = {"train_images": len(files), "classes": classes, "train_time_s": round(time.perf_counter() - t_train, 1),
            "final_train_accuracy_augmented": round(correct / total, 4)}
    return model, info


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx file (gzip), e.g. ``train-images-idx3-ubyte.gz``, as a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise SystemExit(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SystemExit(f"{path}: header says {dims}, found {data.size} bytes of data")
    return data.reshape(dims)


def fashion_split(shared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N int64) of the original idx files of ``split``."""
    images, labels = (read_idx(shared / FASHION / name) for name in FASHION_IDX[split])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise SystemExit(f"unexpected Fashion-MNIST {split} arrays: images {images.shape}, labels {labels.shape}")
    if labels.max() >= len(FASHION_CLASSES):
        raise SystemExit(f"Fashion-MNIST {split}: label {labels.max()} out of range")
    return images, labels.astype(np.int64)


def fashion_selection(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Sorted indices: the first ``per_class`` images of each class in file order (None: all)."""
    if per_class is None:
        return np.arange(len(labels))
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(len(FASHION_CLASSES))]
    short = [FASHION_CLASSES[c] for c, idx in enumerate(chosen) if len(idx) < per_class]
    if short:
        raise SystemExit(f"fewer than {per_class} images of {', '.join(short)}")
    return np.sort(np.concatenate(chosen))


def fashion_file(index: int) -> str:
    """File name of the image at ``index`` of the idx file (zero-padded: name order = file order)."""
    return f"{index:05d}.png"


def _listing(split_dir: Path) -> dict[str, set[str]] | None:
    """{class folder: non-hidden file names} of a split folder; None when it is missing or holds
    anything but folders at the top."""
    if not split_dir.is_dir():
        return None
    entries = [p for p in split_dir.iterdir() if not p.name.startswith(".")]
    if any(not p.is_dir() for p in entries):
        return None
    return {p.name: {f.name for f in p.iterdir() if not f.name.startswith(".")} for p in entries}


def _remove_split(split_dir: Path) -> None:
    """Remove a split folder written by this script (class folders of PNGs only), else refuse."""
    listing = _listing(split_dir)
    if listing is None or not set(listing) <= set(FASHION_CLASSES) or any(
            not name.endswith(".png") for names in listing.values() for name in names):
        raise SystemExit(f"{split_dir} holds something other than Fashion-MNIST class folders of PNGs; "
                         "remove it or pass another --data")
    shutil.rmtree(split_dir)


def write_fashion_mnist(shared: Path, data_root: Path) -> dict:
    """Write ``<data_root>/fashion-mnist/{train,test}/<class>/<n>.png`` from the idx files (see the
    module docstring); a split already there and complete is kept. Returns what each split holds."""
    root = data_root / FASHION_MNIST.data
    info = {"source": str(shared / FASHION), "class_folders": list(FASHION_CLASSES)}
    for split in ("train", "test"):
        images, labels = fashion_split(shared, split)
        per_class = FASHION_PER_CLASS[split]
        chosen = fashion_selection(labels, per_class)
        expected: dict[str, set[str]] = {name: set() for name in FASHION_CLASSES}
        for i in chosen:
            expected[FASHION_CLASSES[labels[i]]].add(fashion_file(int(i)))
        target = root / split
        if _listing(target) == expected:
            log(f"fashion-mnist: {target} complete ({len(chosen)} images), kept")
        else:
            t0 = time.perf_counter()
            tmp = root / f".{split}.tmp"  # renamed when complete: an interrupted run leaves no partial split
            if tmp.exists():
                shutil.rmtree(tmp)
            for name in FASHION_CLASSES:
                (tmp / name).mkdir(parents=True)
            for i in chosen:
                Image.fromarray(images[i]).save(tmp / FASHION_CLASSES[labels[i]] / fashion_file(int(i)))
            if target.exists():
                _remove_split(target)
            os.replace(tmp, target)
            log(f"fashion-mnist: wrote {len(chosen)} {split} images to {target} in {time.perf_counter() - t0:.1f}s")
        info[split] = {"dir": str(target), "images": int(len(chosen)), "idx": list(FASHION_IDX[split]),
                       "selection": "all, in file order" if per_class is None else
                                    f"the first {per_class} of each class in file order",
                       "format": "8-bit grey PNG (mode L), 28x28, file name = index in the idx file"}
    return info


class PadShortcut(torch.nn.Module):
    """The original option-A shortcut of akamaster's CIFAR ResNets, ``F.pad(x[:, :, ::2, ::2])`` with
    zero channels on both sides: the same function as :class:`baselines.ShortcutA` with its default
    channel map, exported as Slice + Pad like the shared model (no index constant)."""

    def __init__(self, pad: int, stride: int):
        super().__init__()
        self.pad, self.stride = pad, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))


def with_pad_shortcuts(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a :class:`baselines.CifarResNet` with every ``ShortcutA`` replaced by
    :class:`PadShortcut` (checked: the channel map must be the option-A one)."""
    from baselines import ShortcutA

    model = copy.deepcopy(model)
    for block in model.modules():
        shortcut = getattr(block, "shortcut", None)
        if isinstance(shortcut, ShortcutA):
            pad = (shortcut.out_channels - shortcut.in_channels) // 2
            index = torch.full((shortcut.out_channels,), shortcut.in_channels, dtype=torch.long)
            index[pad:pad + shortcut.in_channels] = torch.arange(shortcut.in_channels)
            if shortcut.out_channels != shortcut.in_channels + 2 * pad or not torch.equal(shortcut.index, index):
                raise SystemExit("ResNet shortcut is not the option-A channel padding")
            block.shortcut = PadShortcut(pad, shortcut.stride)
    return model


def resnet56_base(shared: Path, check_dir: Path, num_classes: int) -> tuple[torch.nn.Module, dict]:
    """The shared CIFAR-10 ResNet-56 in PyTorch (BatchNorm folded), checked against onnxruntime on
    256 images of ``check_dir`` read by the tool's loader, with a new Linear(64, num_classes)."""
    from baselines import cifar_resnet_from_onnx, verify_torch_model

    path = shared / RESNET56
    net = cifar_resnet_from_onnx(path)
    data = load_calibration(check_dir, InputSpec.from_model(onnx.load(str(path))), limit=256, seed=SEED)
    err = verify_torch_model(net, path, data, n=256)  # raises above 1e-4
    log(f"fashion-mnist: {path.name} rebuilt in PyTorch, max rel. error vs onnxruntime {err:.2g} "
        f"on {min(256, len(data))} images")
    net.linear = torch.nn.Linear(net.linear.in_features, num_classes)  # torch's default init, seeded
    check = {"file": str(path), "sha256": sha256(path), "rebuilt_with": "baselines.cifar_resnet_from_onnx",
             "max_rel_error_vs_onnxruntime": err, "checked_on": f"{min(256, len(data))} images of {check_dir}"}
    return net, check


def train_fashion_mnist(shared: Path, recipe: Recipe, data_root: Path) -> tuple[torch.nn.Module, dict]:
    gen = seed_everything(SEED)
    folder = data_dir("fashion-mnist", recipe, shared, data_root)
    files, labels, classes = image_files(folder / recipe.train_split)
    t0 = time.perf_counter()
    x_all = load_upscaled(files, recipe.resolution)  # grey -> RGB -> 32x32, as the tool's loader
    y_all = torch.tensor(labels)
    log(f"fashion-mnist: {len(files)} train images, {len(classes)} classes, resized to {recipe.resolution} "
        f"in {time.perf_counter() - t0:.0f}s")
    model, base = resnet56_base(shared, folder / recipe.eval_split, len(classes))
    model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    fitted = fit_tensors(model, params, model.train, x_all, y_all, recipe, FASHION_CROP_PAD, gen, "fashion-mnist",
                         clip_grad_norm=FASHION_GRAD_CLIP)
    return model, {"train_images": len(files), "classes": classes, "base_model": base, **fitted}


# --------------------------------------------------------------------------- export and check


def export(model: torch.nn.Module, resolution: int, path: Path) -> None:
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros(1, 3, resolution, resolution)
    torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def expected_preprocess(recipe: Recipe) -> Preprocess:
    """The preprocessing the recipe trains with, as onnx-basisprune's :class:`Preprocess`."""
    return Preprocess(recipe.eval_resize, (recipe.resolution,) * 2, 1 / 255, MEAN, STD, bgr=False)


def evaluate_onnx(path: Path, eval_dir: Path, recipe: Recipe, model: torch.nn.Module) -> dict:
    """Accuracy of the ONNX model with onnxruntime on data loaded by onnx-basisprune's default loader."""
    onnx_model = onnx.load(str(path))
    specs = InputSpec.from_model(onnx_model)
    pre = Preprocess.default_for(specs[0])
    expected = expected_preprocess(recipe)
    if pre != expected:
        raise SystemExit(f"onnx-basisprune's default preprocessing is '{pre.describe()}', "
                         f"the recipe assumes '{expected.describe()}'")
    data = load_calibration(eval_dir, specs, pre)
    if data.class_names != list(class_names(eval_dir)):
        raise SystemExit(f"class order differs: {data.class_names}")
    x, y = data.inputs["input"], data.labels
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    preds = []
    for i in range(0, len(x), 256):
        preds.append(sess.run(["logits"], {"input": x[i:i + 256]})[0].argmax(1))
    pred = np.concatenate(preds)
    with torch.no_grad():  # exported graph agrees with the Torch model
        ref = model.eval()(torch.from_numpy(x[:64])).numpy()
    diff = float(np.abs(sess.run(["logits"], {"input": x[:64]})[0] - ref).max())
    per_class = {name: round(float((pred[y == c] == c).mean()), 4) for c, name in enumerate(data.class_names)}
    return {"accuracy": round(float((pred == y).mean()), 4), "correct": int((pred == y).sum()),
            "images": int(len(y)), "eval_dir": str(eval_dir), "preprocess": pre.describe(),
            "per_class_accuracy": per_class, "max_abs_logit_diff_torch_vs_onnx": diff}


def class_names(split_dir: Path) -> list[str]:
    return [f.name for f in class_folders(split_dir)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def rebuild_check(path: Path, eval_dir: Path, model: torch.nn.Module) -> dict:
    """``baselines.cifar_resnet_from_onnx`` on the exported model gives the trained model back
    (what the Torch-Pruning baseline will prune), on 64 images read by the tool's loader."""
    from baselines import cifar_resnet_from_onnx

    data = load_calibration(eval_dir, InputSpec.from_model(onnx.load(str(path))), limit=64, seed=SEED)
    x = torch.from_numpy(data.inputs["input"])
    with torch.no_grad():
        diff = float((cifar_resnet_from_onnx(path)(x) - model.eval()(x)).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"cifar_resnet_from_onnx({path.name}) differs from the trained model by {diff:.3g}")
    return {"max_abs_logit_diff_rebuilt_vs_trained": diff, "images": len(data)}


def data_dir(key: str, recipe: Recipe, shared: Path, data_root: Path) -> Path:
    """The image folders of a recipe: ``<shared>/data/<data>``, or for Fashion-MNIST the folders
    this script writes under ``data_root``."""
    return data_root / recipe.data if key == "fashion-mnist" else shared / "data" / recipe.data


def required_assets(key: str, shared: Path) -> list[Path]:
    if key == "fashion-mnist":
        return [shared / RESNET56] + [shared / FASHION / name for names in FASHION_IDX.values() for name in names]
    return [shared / WEIGHTS, shared / "data" / RECIPES[key].data]


def recipe_notes(key: str, recipe: Recipe, model: torch.nn.Module, classes: list[str]) -> dict:
    """What the JSON records about a recipe beyond its fields."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common = {"trainable_params": trainable, "seed": SEED, "torch_threads": THREADS}
    if key == "fashion-mnist":
        return {"base": f"akamaster CIFAR-10 ResNet-56 ({RESNET56}), BatchNorm folded into the convolutions, "
                        "rebuilt in PyTorch by baselines.cifar_resnet_from_onnx",
                "classifier": f"Linear(64, {len(classes)}), re-initialised (torch default init, seeded)",
                "trainable": "all layers (conv weights and their folded-BatchNorm biases, classifier)",
                **common,
                "optimizer": f"SGD momentum 0.9 Nesterov, no weight decay on biases, gradients clipped to total "
                             f"norm {FASHION_GRAD_CLIP:g}",
                "schedule": "linear warmup then cosine to 0, per step",
                "grad_clip_norm": FASHION_GRAD_CLIP,
                "crop_padding": FASHION_CROP_PAD,
                "normalisation": "grey -> RGB (PIL convert), resize 28 -> 32 (PIL bilinear), /255, ImageNet mean/std",
                "export": "option-A shortcut as F.pad(x[:, :, ::2, ::2]) on channels (Slice + Pad), as the shared model"}
    return {"base": "torchvision mobilenet_v2 IMAGENET1K_V1 (" + WEIGHTS + ")",
            "classifier": f"Dropout(0.2) + Linear(1280, {len(classes)})",
            "trainable": "all layers" if recipe.frozen_blocks == 0 else
                         f"features[{recipe.frozen_blocks}:] + classifier",
            "trainable_params": trainable,
            "optimizer": "SGD momentum 0.9 Nesterov, no weight decay on BatchNorm/bias",
            "schedule": "linear warmup then cosine to 0, per step",
            "normalisation": "/255, ImageNet mean/std", "seed": SEED, "torch_threads": THREADS}


TRAIN = {"cifar10": train_cifar10, "hymenoptera": train_hymenoptera, "fashion-mnist": train_fashion_mnist}


def trained_elsewhere(key: str, shared: Path, trained: Path) -> tuple[torch.nn.Module, dict]:
    """A MobileNetV2 recipe trained by ``--train-only`` (on another machine): its state_dict and
    training record from ``trained``."""
    name = RECIPES[key].name
    info = json.loads((trained / f"{name}.train.json").read_text())
    model = mobilenet_v2(shared, len(info["classes"]))
    model.load_state_dict(torch.load(trained / f"{name}.pth", map_location="cpu", weights_only=True))
    return model, info


def train(key: str, shared: Path, epochs: int | None, data_root: Path) -> tuple[torch.nn.Module, Recipe, dict]:
    """Train one recipe on ``DEVICE``; the model comes back on the CPU, with the training record."""
    recipe = RECIPES[key]
    if epochs is not None:
        recipe = Recipe(**{**asdict(recipe), "epochs": epochs})
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=DEVICE.type == "cuda")  # some CUDA backward ops have none
    model, info = TRAIN[key](shared, recipe, data_root)
    info["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else cpu_name()
    return model.cpu(), recipe, info


def build(key: str, shared: Path, out: Path, epochs: int | None, data_root: Path | None = None,
          data_info: dict | None = None, trained: Path | None = None) -> dict:
    data_root = data_root if data_root is not None else REPO / "build" / "benchmarks" / "data"
    if trained is None:
        model, recipe, info = train(key, shared, epochs, data_root)
    else:
        model, info = trained_elsewhere(key, shared, trained)
        recipe = Recipe(**{**asdict(RECIPES[key]), "epochs": info["epochs"]})
    folder = data_dir(key, recipe, shared, data_root)
    path = out / f"{recipe.name}.onnx"
    tmp = out / f"{recipe.name}.onnx.tmp"  # renamed once checked: a failed run leaves no model to skip
    export(with_pad_shortcuts(model) if key == "fashion-mnist" else model, recipe.resolution, tmp)
    result = evaluate_onnx(tmp, folder / recipe.eval_split, recipe, model)
    extra = {"rebuild_check": rebuild_check(tmp, folder / recipe.eval_split, model)} if key == "fashion-mnist" else {}
    os.replace(tmp, path)
    # The PyTorch model, for the Torch-Pruning baseline. baselines.torch_model_for reads MODEL.pth as a
    # MobileNetV2 and rebuilds CIFAR ResNets from the ONNX graph: the ResNet's state_dict gets another name.
    weights = out / (f"{recipe.name}.state_dict.pth" if key == "fashion-mnist" else f"{recipe.name}.pth")
    torch.save(model.state_dict(), weights)
    log(f"exported {path} and {weights.name}")
    log(f"{key}: onnxruntime accuracy {result['accuracy']:.4f} ({result['correct']}/{result['images']} "
        f"{recipe.eval_split} images)")
    if key == "fashion-mnist":
        extra["pytorch_state_dict"] = {
            "file": weights.name,
            "load": "net = baselines.CifarResNet(9, (16, 32, 64), 10); net.load_state_dict(torch.load(file))"}
        extra["data"] = data_info
    return {
        "file": path.name, "sha256": sha256(path),
        "input": [None, 3, recipe.resolution, recipe.resolution],
        "recipe": {**asdict(recipe), **recipe_notes(key, recipe, model, info["classes"])},
        **info, f"{recipe.eval_split}": result, **extra,
        "prune_command": (f"python -m onnx_basisprune {path} --calib {folder / recipe.train_split} "
                          f"--eval {folder / recipe.eval_split}"),
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }


def relative_paths(value):
    """``value`` (the JSON record) with paths under the checkout's folder written relative to the
    repository (``build/...``, ``../shared/...``), not as the absolute paths of this machine."""
    if isinstance(value, dict):
        return {k: relative_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v) for v in value]
    if isinstance(value, str):
        return value.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "benchmarks" / "models",
                        help="output folder (default: <repo>/build/benchmarks/models)")
    parser.add_argument("--data", type=Path, default=REPO / "build" / "benchmarks" / "data",
                        help="where the Fashion-MNIST image folders are written (default: <repo>/build/benchmarks/data)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                        help="shared assets folder (default: <repo>/../shared)")
    parser.add_argument("--only", choices=tuple(RECIPES), help="build just this model")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    parser.add_argument("--device", default="cpu", help="train cifar10 on this Torch device (e.g. cuda; default cpu)")
    parser.add_argument("--train-only", action="store_true",
                        help="with --only cifar10: train and write <name>.pth and <name>.train.json to --out, nothing else "
                             "(for training on another machine, e.g. one with a GPU)")
    parser.add_argument("--trained", type=Path, help="with --only cifar10: export and evaluate the model --train-only wrote here")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if (args.train_only or args.trained) and args.only != "cifar10":
        parser.error("--train-only and --trained go with --only cifar10")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    if args.train_only:
        args.out.mkdir(parents=True, exist_ok=True)
        model, recipe, info = train("cifar10", args.shared.resolve(), args.epochs, args.data.resolve())
        torch.save(model.state_dict(), args.out / f"{recipe.name}.pth")
        info = {**info, "epochs": recipe.epochs, "torch": torch.__version__}
        (args.out / f"{recipe.name}.train.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"wrote {recipe.name}.pth and {recipe.name}.train.json to {args.out}")
        return 0
    shared = args.shared.resolve()
    keys = [args.only] if args.only else list(RECIPES)
    missing = [str(p) for key in keys for p in required_assets(key, shared) if not p.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)} (pass --shared DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    data_root = args.data.resolve()
    json_path = args.out / JSON_NAME
    record = json.loads(json_path.read_text()) if json_path.is_file() else {}
    for key in keys:
        # The benchmark reads the Fashion-MNIST folders too, so they are written (once) even when
        # the model is already there.
        data_info = write_fashion_mnist(shared, data_root) if key == "fashion-mnist" else None
        path = args.out / f"{RECIPES[key].name}.onnx"
        if path.exists() and not args.force:
            log(f"{path} exists, skipped (--force rebuilds)")
            continue
        record[RECIPES[key].name] = build(key, shared, args.out, args.epochs, data_root, data_info, args.trained)
        json_path.write_text(json.dumps(relative_paths(record), indent=2) + "\n")  # after each model
        log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
