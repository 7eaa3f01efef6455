"""Build the transfer-learning benchmark models: ImageNet MobileNetV2 fine-tuned on a small domain.

    python benchmarks/transfer_models.py [--out DIR] [--shared DIR] [--only cifar10|hymenoptera]
                                         [--force] [--epochs N]

Writes to ``--out`` (default ``<repo>/build/benchmarks/models``):

* ``mobilenet_v2_cifar10.onnx``: input [N,3,64,64]. torchvision MobileNetV2 ``IMAGENET1K_V1``,
  classifier replaced by Linear(1280, 10), all layers fine-tuned on the 10,000 CIFAR-10 train
  PNGs of ``../shared`` upscaled 32 -> 64 (PIL bilinear), random crop (padding 8 at 64 px, i.e. 4 at
  32) + horizontal flip, ImageNet mean/std; SGD + Nesterov, cosine learning rate.
  Accuracy on all 10,000 test images with onnxruntime, preprocessed by onnx-basisprune's own
  default loader (resize 32 -> 64, /255, ImageNet mean/std): the same as training, so
  ``python -m onnx_basisprune MODEL --calib .../cifar10/train --eval .../cifar10/test`` needs no
  preprocessing options.
* ``mobilenet_v2_hymenoptera.onnx``: input [N,3,224,224], ants/bees (Linear(1280, 2)), standard
  torchvision recipe (train RandomResizedCrop(224) + flip; eval Resize(256) + CenterCrop(224)),
  last blocks + classifier fine-tuned. Accuracy on the 153 val images with onnxruntime and the
  tool's default loader (which is Resize(256) + CenterCrop(224) for a 224 input).
* ``<name>.pth``: the fine-tuned PyTorch state_dict of each model (``torchvision.models.mobilenet_v2``
  with ``classifier[1] = Linear(1280, classes)``), for baselines that prune the PyTorch model.
* ``transfer_models.json``: recipe, epochs, resolution, training time, accuracies, versions, date,
  CPU; entries of models that are skipped (already built, no ``--force``) are kept.

Reproducible: fixed seeds, 2 Torch threads, deterministic data order and augmentation (one
``torch.Generator`` per model). Class indices follow the sorted folder names (the
ImageFolder convention, as in onnx-basisprune's loader). Shared assets are read in place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
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

from onnx_basisprune.calibration.data import InputSpec, Preprocess, load_calibration  # noqa: E402

THREADS = 2
SEED = 0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WEIGHTS = "models/mobilenet_v2_imagenet.pth"
JSON_NAME = "transfer_models.json"


@dataclass(frozen=True)
class Recipe:
    name: str  # output file stem
    data: str  # folder under <shared>/data
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
    resolution=64, epochs=20, batch_size=64, lr=0.03, weight_decay=4e-5, warmup_epochs=0.5,
    label_smoothing=0.1, frozen_blocks=0,
    augmentation="PIL bilinear resize 32->64 once; per epoch random crop 64 of the zero-padded (8 px) image + horizontal flip",
    eval_resize=None)
HYMENOPTERA = Recipe(
    name="mobilenet_v2_hymenoptera", data="hymenoptera", train_split="train", eval_split="val",
    resolution=224, epochs=12, batch_size=16, lr=0.01, weight_decay=4e-5, warmup_epochs=0.0,
    label_smoothing=0.0, frozen_blocks=14,
    augmentation="RandomResizedCrop(224) + RandomHorizontalFlip (torchvision)",
    eval_resize=256)
RECIPES = {"cifar10": CIFAR10, "hymenoptera": HYMENOPTERA}


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
    """uint8 N x 3 x size x size, PIL bilinear resize (as onnx-basisprune's loader does)."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the zero-padded batch (same size) + random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    flip = torch.rand(n, generator=gen).lt(0.5).tolist()
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train_cifar10(shared: Path, recipe: Recipe) -> tuple[torch.nn.Module, dict]:
    gen = seed_everything(SEED)
    files, labels, classes = image_files(shared / "data" / recipe.data / recipe.train_split)
    t0 = time.perf_counter()
    x_all = load_upscaled(files, recipe.resolution)
    y_all = torch.tensor(labels)
    log(f"cifar10: {len(files)} train images, {len(classes)} classes, upscaled to {recipe.resolution} "
        f"in {time.perf_counter() - t0:.0f}s")
    model = mobilenet_v2(shared, len(classes)).to(memory_format=torch.channels_last)
    params = freeze(model, recipe.frozen_blocks)
    steps_per_epoch = len(files) // recipe.batch_size  # drop the last partial batch
    opt, sched = make_optimizer(params, recipe, steps_per_epoch * recipe.epochs)
    pad = recipe.resolution // 8
    t_train = time.perf_counter()
    for epoch in range(recipe.epochs):
        set_train_mode(model, recipe.frozen_blocks)
        order = torch.randperm(len(files), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        t_epoch = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            x = normalise(crop_flip(x_all[idx], pad, gen))
            y = y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
        log(f"cifar10 epoch {epoch + 1}/{recipe.epochs}: loss {loss_sum / total:.3f}, "
            f"train acc {correct / total:.4f}, {time.perf_counter() - t_epoch:.0f}s")
    info = {"train_images": len(files), "classes": classes, "train_time_s": round(time.perf_counter() - t_train, 1),
            "final_train_accuracy_augmented": round(correct / total, 4)}
    return model, info


# --------------------------------------------------------------------------- ants / bees


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def train_hymenoptera(shared: Path, recipe: Recipe) -> tuple[torch.nn.Module, dict]:
    gen = seed_everything(SEED)
    files, labels, classes = image_files(shared / "data" / recipe.data / recipe.train_split)
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


# --------------------------------------------------------------------------- export and check


def export(model: torch.nn.Module, resolution: int, path: Path) -> None:
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros(1, 3, resolution, resolution)
    torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def evaluate_onnx(path: Path, eval_dir: Path, recipe: Recipe, model: torch.nn.Module) -> dict:
    """Accuracy of the ONNX model with onnxruntime on data loaded by onnx-basisprune's default loader."""
    onnx_model = onnx.load(str(path))
    specs = InputSpec.from_model(onnx_model)
    pre = Preprocess.default_for(specs[0])
    expected = Preprocess(recipe.eval_resize, (recipe.resolution,) * 2, 1 / 255, MEAN, STD, bgr=False)
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


def build(key: str, shared: Path, out: Path, epochs: int | None) -> dict:
    recipe = RECIPES[key]
    if epochs is not None:
        recipe = Recipe(**{**asdict(recipe), "epochs": epochs})
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    train = train_cifar10 if key == "cifar10" else train_hymenoptera
    model, info = train(shared, recipe)
    path = out / f"{recipe.name}.onnx"
    tmp = out / f"{recipe.name}.onnx.tmp"  # renamed once checked: a failed run leaves no model to skip
    export(model, recipe.resolution, tmp)
    result = evaluate_onnx(tmp, shared / "data" / recipe.data / recipe.eval_split, recipe, model)
    os.replace(tmp, path)
    weights = out / f"{recipe.name}.pth"  # the PyTorch model, for the Torch-Pruning baseline
    torch.save(model.state_dict(), weights)
    log(f"exported {path} and {weights.name}")
    log(f"{key}: onnxruntime accuracy {result['accuracy']:.4f} ({result['correct']}/{result['images']} "
        f"{recipe.eval_split} images)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "file": path.name, "sha256": sha256(path),
        "input": [None, 3, recipe.resolution, recipe.resolution],
        "recipe": {**asdict(recipe), "base": "torchvision mobilenet_v2 IMAGENET1K_V1 (" + WEIGHTS + ")",
                   "classifier": f"Dropout(0.2) + Linear(1280, {len(info['classes'])})",
                   "trainable": "all layers" if recipe.frozen_blocks == 0 else
                                f"features[{recipe.frozen_blocks}:] + classifier",
                   "trainable_params": trainable,
                   "optimizer": "SGD momentum 0.9 Nesterov, no weight decay on BatchNorm/bias",
                   "schedule": "linear warmup then cosine to 0, per step",
                   "normalisation": "/255, ImageNet mean/std", "seed": SEED, "torch_threads": THREADS},
        **info, f"{recipe.eval_split}": result,
        "prune_command": (f"python -m onnx_basisprune {path} --calib {shared / 'data' / recipe.data / recipe.train_split} "
                          f"--eval {shared / 'data' / recipe.data / recipe.eval_split}"),
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "benchmarks" / "models",
                        help="output folder (default: <repo>/build/benchmarks/models)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                        help="shared assets folder (default: <repo>/../shared)")
    parser.add_argument("--only", choices=tuple(RECIPES), help="build just this model")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    shared = args.shared.resolve()
    if not (shared / WEIGHTS).is_file():
        parser.error(f"{shared / WEIGHTS} not found (pass --shared DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / JSON_NAME
    record = json.loads(json_path.read_text()) if json_path.is_file() else {}
    for key in [args.only] if args.only else list(RECIPES):
        path = args.out / f"{RECIPES[key].name}.onnx"
        if path.exists() and not args.force:
            log(f"{path} exists, skipped (--force rebuilds)")
            continue
        record[RECIPES[key].name] = build(key, shared, args.out, args.epochs)
        json_path.write_text(json.dumps(record, indent=2) + "\n")  # after each model
        log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
