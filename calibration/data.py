"""Calibration data: load images or arrays from the user's domain as model-ready numpy arrays.

Sources
-------
* **Image folder with class subfolders** (torchvision ImageFolder convention): label = index of
  the folder in the sorted list of non-hidden subfolders; images are found recursively inside
  each. Empty class folders keep their index. A labels file changes the mapping: a text file
  with one folder name per line (line number = class index, from 0) or a JSON object
  ``{folder: index}``. Every class folder must be named in it and every name must be a folder.
* **Flat image folder** (images directly inside, no class subfolders): unlabeled.
  A folder holding both top-level images and class subfolders is rejected as ambiguous.
  Images: ``.png .jpg .jpeg .bmp .webp`` (any case), any size, grey or colour, read with PIL.
* **.npy**: one array, ``N×C×H×W`` or ``N×H×W×C`` (``N×H×W`` for 1-channel inputs).
* **.npz**: an ``x`` or ``images`` array with optional ``y`` or ``labels``; or one array per model
  input name (multi-input or non-image models), again with optional ``y``/``labels``.

Arrays are not resized: their spatial size must match the model's. ``uint8`` arrays feeding a
float image input are raw pixels (RGB order) and get the scale/mean/std/channel-order steps
below; other arrays are taken as already preprocessed and are only transposed to the model's
layout and cast to its dtype. Everything is loaded with ``allow_pickle=False``.

Default preprocessing (:meth:`Preprocess.default_for`), from the model input
---------------------------------------------------------------------------
* Size: inputs larger than 64 px (short side) follow the ImageNet recipe: resize the short side
  to ``round(size·256/224)`` (224 → 256) and centre-crop to the input size. Inputs of 64 px or
  less (CIFAR, MNIST style) are trained on whole images, so the image is resized directly to the
  input size with no crop. Resizing is bilinear (PIL, antialiased), as in torchvision.
* Values: float inputs get ``/255``; 3-channel inputs then ImageNet mean (0.485, 0.456, 0.406)
  and std (0.229, 0.224, 0.225) (the usual statistics, also used by common CIFAR models);
  1-channel (grey, PIL mode ``L``) and 4-channel (``RGBA``) inputs get mean 0, std 1, i.e. just
  ``/255``, since there is no common convention for them. Integer inputs (e.g. ``uint8``)
  get raw pixel values (scale 1, mean 0, std 1).
* Channel order RGB. Output in the model's layout (NCHW or NHWC) and dtype.

Any field can be overridden with ``dataclasses.replace(Preprocess.default_for(spec), ...)``.
Models with symbolic height/width need the size from the user: a :class:`Preprocess` with
``crop=(H, W)``. :meth:`Preprocess.describe` prints exactly the steps used, and the loaded
set's ``source`` repeats it.

Bad input raises :class:`CalibrationDataError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_INPUT_PX = 64
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_IMAGE_LAYOUTS = ("NCHW", "NHWC")
_X_KEYS = ("x", "images")
_Y_KEYS = ("y", "labels")


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used as given; the message says what and where."""


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _fmt_samples(dims: tuple[int | None, ...]) -> str:
    """The shape of N samples of ``dims``, e.g. ``(N, 3, 32, 32)``."""
    return _fmt_shape((None, *dims)).replace("?", "N", 1)


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """One real graph input of a model, with its layout guessed from the shape."""

    name: str
    layout: str  # "NCHW", "NHWC" or "other" (non-image input)
    channels: int | None
    height: int | None
    width: int | None
    dtype: np.dtype
    shape: tuple[int | None, ...] | None = None  # declared shape, None = unknown rank

    @property
    def is_image(self) -> bool:
        return self.layout in _IMAGE_LAYOUTS

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> list[InputSpec]:
        """One spec per graph input that is not an initializer."""
        initializers = {init.name for init in model.graph.initializer}
        return [cls._from_value_info(vi) for vi in model.graph.input if vi.name not in initializers]

    @classmethod
    def _from_value_info(cls, vi: onnx.ValueInfoProto) -> InputSpec:
        if vi.type.WhichOneof("value") != "tensor_type":
            raise CalibrationDataError(f"model input '{vi.name}' is not a tensor")
        tensor = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if not tensor.HasField("shape"):
            return cls(vi.name, "other", None, None, None, dtype, None)
        shape = tuple(d.dim_value if d.dim_value > 0 else None for d in tensor.shape.dim)
        layout = _guess_layout(shape)
        if layout == "NCHW":
            return cls(vi.name, layout, shape[1], shape[2], shape[3], dtype, shape)
        if layout == "NHWC":
            return cls(vi.name, layout, shape[3], shape[1], shape[2], dtype, shape)
        return cls(vi.name, layout, None, None, None, dtype, shape)


def _guess_layout(shape: tuple[int | None, ...]) -> str:
    """NCHW when dim 1 is 1, 3 or 4 and the last dim is not; NHWC when the last dim is; else other."""
    if len(shape) != 4:
        return "other"
    if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        return "NCHW"
    if shape[3] in (1, 3, 4):
        return "NHWC"
    return "other"


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize, centre-crop, ``x·scale``, ``(x - mean) / std``, channel order."""

    resize: int | None  # short side; None = resize directly to the output size
    crop: tuple[int, int] | None  # (height, width); None = the model's input size
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr: bool

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise CalibrationDataError(f"scale must be positive, got {self.scale}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise CalibrationDataError(f"mean {self.mean} and std {self.std} need the same, non-zero length")
        if min(self.std) <= 0:
            raise CalibrationDataError(f"std values must be positive, got {self.std}")
        if self.bgr and len(self.mean) not in (3, 4):
            raise CalibrationDataError("bgr needs 3- or 4-channel mean/std")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            raise CalibrationDataError(f"crop must be (height, width) > 0, got {self.crop}")
        if self.resize is not None and self.resize < 1:
            raise CalibrationDataError(f"resize must be positive, got {self.resize}")

    @classmethod
    def default_for(cls, spec: InputSpec) -> Preprocess:
        """The documented default for an image input with a known size (see module docstring)."""
        height, width = _target_size(spec, None)
        short = min(height, width)
        resize = None if short <= SMALL_INPUT_PX else round(short * 256 / 224)
        return cls(resize, (height, width), *_default_values(spec), bgr=False)

    def describe(self) -> str:
        """One line naming every step, e.g. for a report."""
        return ", ".join([self._describe_size(), self._describe_scale(),
                          f"mean {_fmt_values(self.mean)}", f"std {_fmt_values(self.std)}",
                          self._describe_order()])

    def _describe_size(self) -> str:
        crop = "the model input size" if self.crop is None else f"{self.crop[0]}x{self.crop[1]}"
        if self.resize is None:
            return f"resize to {crop}"
        return f"resize short side {self.resize}, centre-crop {crop}"

    def _describe_scale(self) -> str:
        inverse = 1 / self.scale
        return f"/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"x{self.scale:g}"

    def _describe_order(self) -> str:
        names = {1: "grey", 3: "RGB", 4: "RGBA"}
        name = names.get(len(self.mean), f"{len(self.mean)} channels")
        return name.replace("RGB", "BGR") if self.bgr else name


def _fmt_values(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _default_values(spec: InputSpec) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    """Default (scale, mean, std) for an image input."""
    channels = _image_channels(spec)
    if spec.dtype.kind != "f":
        return 1.0, (0.0,) * channels, (1.0,) * channels
    if channels == 3:
        return 1 / 255, IMAGENET_MEAN, IMAGENET_STD
    return 1 / 255, (0.0,) * channels, (1.0,) * channels


def _image_channels(spec: InputSpec) -> int:
    if not spec.is_image:
        raise CalibrationDataError(f"input '{spec.name}' is not an image input (layout {spec.layout})")
    if spec.channels not in _IMAGE_MODES:
        raise CalibrationDataError(f"input '{spec.name}' has {spec.channels} channels; images give 1, 3 or 4")
    if spec.dtype.kind not in "fiu":
        raise CalibrationDataError(f"input '{spec.name}' has non-numeric dtype {spec.dtype}")
    return spec.channels


def _target_size(spec: InputSpec, pre: Preprocess | None) -> tuple[int, int]:
    """Output (height, width): the model's size, or the user's crop where the model's is symbolic."""
    _image_channels(spec)
    model = (spec.height, spec.width)
    crop = None if pre is None else pre.crop
    if crop is None:
        if None in model:
            raise CalibrationDataError(
                f"input '{spec.name}' has symbolic height/width {_fmt_shape(model)}; "
                "give the size as Preprocess(crop=(H, W), ...)")
        return model  # type: ignore[return-value]
    if any(m is not None and m != c for m, c in zip(model, crop)):
        raise CalibrationDataError(f"crop {crop} does not match input '{spec.name}' size {_fmt_shape(model)}")
    return tuple(crop)  # type: ignore[return-value]


def _check_image_steps(spec: InputSpec, pre: Preprocess, size: tuple[int, int]) -> None:
    if pre.resize is not None and pre.resize < max(size):
        raise CalibrationDataError(f"resize {pre.resize} is smaller than the crop {size[0]}x{size[1]}")
    _check_channels(spec, pre)


def _check_channels(spec: InputSpec, pre: Preprocess) -> None:
    if len(pre.mean) != _image_channels(spec):
        raise CalibrationDataError(
            f"mean/std have {len(pre.mean)} values but input '{spec.name}' has {spec.channels} channels")


def _normalise(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Channel-last pixels (..., C) → float32 ``(x·scale - mean) / std`` in the chosen channel order."""
    x = pixels.astype(np.float32)
    if pre.bgr:
        x = x[..., [2, 1, 0, *range(3, x.shape[-1])]]
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    return (x * np.float32(pre.scale) - mean) / std


def _to_model(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Channel-last float array (N, H, W, C) → the model's layout and dtype."""
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    if spec.dtype.kind in "iu":
        x = np.rint(x)
        info = np.iinfo(spec.dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise CalibrationDataError(
                f"preprocessed values [{x.min():g}, {x.max():g}] do not fit input '{spec.name}' "
                f"dtype {spec.dtype}")
    return np.ascontiguousarray(x, dtype=spec.dtype)


# --------------------------------------------------------------------------- the loaded set


@dataclass
class CalibrationSet:
    """Model-ready calibration samples: one array per model input, optional integer labels."""

    inputs: dict[str, np.ndarray]  # input name -> (N, ...) in the model's layout and dtype
    labels: np.ndarray | None  # int64 (N,) or None
    class_names: list[str] | None  # index -> name, when known
    source: str  # what was loaded and how, for the report

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, idx: np.ndarray) -> CalibrationSet:
        idx = np.asarray(idx, dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        inputs = {name: x[idx] for name, x in self.inputs.items()}
        return CalibrationSet(inputs, labels, self.class_names, self.source)

    def split(self, holdout: float, seed: int) -> tuple[CalibrationSet, CalibrationSet]:
        """(rest, held out): a deterministic split, stratified by label when labeled."""
        if not 0 < holdout < 1:
            raise CalibrationDataError(f"holdout must be between 0 and 1, got {holdout}")
        n_held = round(holdout * len(self))
        if not 0 < n_held < len(self):
            raise CalibrationDataError(f"holdout {holdout} of {len(self)} samples leaves an empty part")
        order = _sample_order(self.labels, len(self), seed, proportional=True)
        return self.subset(np.sort(order[n_held:])), self.subset(np.sort(order[:n_held]))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches (the last may be smaller) of inputs and labels."""
        if batch_size < 1:
            raise CalibrationDataError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            labels = None if self.labels is None else self.labels[part]
            yield {name: x[part] for name, x in self.inputs.items()}, labels


def _sample_order(labels: np.ndarray | None, n: int, seed: int, proportional: bool) -> np.ndarray:
    """A deterministic random order of ``range(n)`` whose prefixes are class-stratified.

    Each sample gets its rank within its class (in a random order). Prefixes of the order sorted
    by rank hold equal counts per class (``proportional=False``, for ``limit``); sorted by
    rank / class size they hold each class in proportion to its size (for ``split``).
    """
    perm = np.random.default_rng(seed).permutation(n)
    if labels is None:
        return perm
    shuffled = labels[perm]
    grouped = np.argsort(shuffled, kind="stable")  # by class, random within each class
    sorted_labels = shuffled[grouped]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(n) - first
    key = np.empty(n, dtype=np.float64)
    if proportional:
        size = np.searchsorted(sorted_labels, sorted_labels, side="right") - first
        key[grouped] = (rank + 0.5) / size
    else:
        key[grouped] = rank
    return perm[np.argsort(key, kind="stable")]  # ties keep the random order


def _choose(labels: np.ndarray | None, n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` samples, class-balanced when labeled."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise CalibrationDataError(f"limit must be at least 1, got {limit}")
    return np.sort(_sample_order(labels, n, seed, proportional=False)[:limit])


def _check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    if labels.size and labels.min() < 0:
        raise CalibrationDataError(f"{where}: negative label {labels.min()}")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise CalibrationDataError(f"{where}: label {labels.max()} is out of range for {num_classes} classes")


# --------------------------------------------------------------------------- entry point


def load_calibration(path: str | Path, specs: list[InputSpec], preprocess: Preprocess | None = None,
                     labels_file: str | Path | None = None, num_classes: int | None = None,
                     limit: int | None = None, seed: int = 0) -> CalibrationSet:
    """Load an image folder, ``.npy`` or ``.npz`` as a :class:`CalibrationSet` for ``specs``.

    ``limit`` keeps at most that many samples: a deterministic (``seed``) random subset,
    class-balanced when labeled; only the chosen images are decoded.
    """
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"calibration data not found: {path}")
    if not specs:
        raise CalibrationDataError("the model has no inputs")
    if path.is_dir():
        return _load_folder(path, specs, preprocess, labels_file, num_classes, limit, seed)
    if labels_file is not None:
        raise CalibrationDataError("labels_file applies to image folders only")
    if path.suffix.lower() == ".npy":
        return _load_npy(path, specs, preprocess, limit, seed)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, specs, preprocess, num_classes, limit, seed)
    raise CalibrationDataError(f"unsupported calibration data {path}: expected an image folder, .npy or .npz")


# --------------------------------------------------------------------------- image folders


def _load_folder(path: Path, specs: list[InputSpec], preprocess: Preprocess | None,
                 labels_file: str | Path | None, num_classes: int | None,
                 limit: int | None, seed: int) -> CalibrationSet:
    spec = _single_input(specs, f"image folder {path}")
    pre = preprocess or Preprocess.default_for(spec)
    size = _target_size(spec, pre)
    _check_image_steps(spec, pre, size)
    files, labels, class_names = _scan_folder(path, labels_file)
    if labels is not None:
        _check_labels(labels, num_classes, f"labels of {path}")
    chosen = _choose(labels, len(files), limit, seed)
    x = _decode_all([files[i] for i in chosen], spec, pre, size)
    classes = "" if class_names is None else f", {len(class_names)} classes"
    source = f"image folder {path}: {len(chosen)} of {len(files)} images{classes} ({pre.describe()})"
    return CalibrationSet({spec.name: x}, None if labels is None else labels[chosen], class_names, source)


def _single_input(specs: list[InputSpec], what: str) -> InputSpec:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise CalibrationDataError(f"{what} feeds one input but the model has {len(specs)} ({names}); "
                                   "use an .npz with one array per input")
    return specs[0]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _scan_folder(path: Path, labels_file: str | Path | None
                 ) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """(image files, labels or None, class names or None) for a flat or class-subfolder folder."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise CalibrationDataError(f"calibration folder is empty: {path}")
    top = sorted(p for p in entries if _is_image(p))
    folders = {p.name: _images_under(p) for p in sorted(entries) if p.is_dir()}
    nested = any(folders.values())
    if top and nested:
        raise CalibrationDataError(f"{path} holds both images and class subfolders; use one or the other")
    if top:
        if labels_file is not None:
            raise CalibrationDataError(f"labels_file given but {path} has no class subfolders")
        return top, None, None
    if not nested:
        raise CalibrationDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
    if labels_file is None:
        index = {name: i for i, name in enumerate(folders)}
    else:
        index = _read_labels_file(Path(labels_file), set(folders))
    files = [f for name in folders for f in folders[name]]
    labels = np.array([index[name] for name in folders for _ in folders[name]], dtype=np.int64)
    return files, labels, _class_names(index)


def _class_names(index: dict[str, int]) -> list[str]:
    names = [""] * (max(index.values()) + 1)
    for name, i in index.items():
        names[i] = name
    return names


def _read_labels_file(path: Path, folders: set[str]) -> dict[str, int]:
    """Folder name → class index from a text file (line number = index) or a JSON object."""
    if not path.is_file():
        raise CalibrationDataError(f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"cannot read labels file {path}: {_oneline(exc)}") from exc
    is_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    index = _parse_json_labels(text, path) if is_json else _parse_text_labels(text, path)
    unknown = sorted(set(index) - folders)
    if unknown:
        raise CalibrationDataError(
            f"labels file {path} names folders that do not exist: {', '.join(unknown[:5])}")
    unnamed = sorted(folders - set(index))
    if unnamed:
        raise CalibrationDataError(f"labels file {path} does not name folders: {', '.join(unnamed[:5])}")
    return index


def _parse_text_labels(text: str, path: Path) -> dict[str, int]:
    names = [line.strip() for line in text.rstrip().splitlines()]
    if not names or "" in names:
        raise CalibrationDataError(f"labels file {path} needs one folder name per line, without blank lines")
    if len(set(names)) != len(names):
        raise CalibrationDataError(f"labels file {path} names a folder twice")
    return {name: i for i, name in enumerate(names)}


def _parse_json_labels(text: str, path: Path) -> dict[str, int]:
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationDataError(f"labels file {path} is not valid JSON: {_oneline(exc)}") from exc
    if not isinstance(index, dict) or not index:
        raise CalibrationDataError(f"labels file {path} must be a JSON object {{folder: index}}")
    for name, i in index.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise CalibrationDataError(
                f"labels file {path}: '{name}' maps to {i!r}, not a non-negative integer")
    if len(set(index.values())) != len(index):
        raise CalibrationDataError(f"labels file {path} maps two folders to the same index")
    return index


def _decode_all(files: list[Path], spec: InputSpec, pre: Preprocess, size: tuple[int, int]) -> np.ndarray:
    """Decode and preprocess ``files`` (in parallel threads; PIL releases the GIL) into one array."""
    height, width = size
    out = np.empty((len(files), height, width, spec.channels), dtype=np.float32)
    mode = _IMAGE_MODES[spec.channels]

    def fill(i: int) -> None:
        out[i] = _normalise(_read_image(files[i], mode, pre, size), pre)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(files))))
    return _to_model(out, spec)


def _read_image(path: Path, mode: str, pre: Preprocess, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (H, W, C) after resize and crop."""
    try:
        with Image.open(path) as img:
            img = _resize_and_crop(img.convert(mode), pre.resize, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CalibrationDataError(f"cannot read image {path}: {_oneline(exc)}") from exc
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _resize_and_crop(img: Image.Image, resize: int | None, size: tuple[int, int]) -> Image.Image:
    """torchvision ``Resize(resize)`` + ``CenterCrop(size)``, or a direct resize when ``resize`` is None."""
    height, width = size
    if resize is None:
        return img.resize((width, height), Image.Resampling.BILINEAR)
    w, h = img.size
    new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize(new, Image.Resampling.BILINEAR)
    top = int(round((new[1] - height) / 2.0))
    left = int(round((new[0] - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


# --------------------------------------------------------------------------- array files


def _read_array(path: Path, mmap: bool = False) -> np.ndarray | np.lib.npyio.NpzFile:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"cannot read {path}: {_oneline(exc)}") from exc


def _load_npy(path: Path, specs: list[InputSpec], preprocess: Preprocess | None,
              limit: int | None, seed: int) -> CalibrationSet:
    spec = _single_input(specs, str(path))
    arr = _read_array(path, mmap=True)
    _check_samples(arr, f"{path}")
    chosen = _choose(None, len(arr), limit, seed)
    x = _prepare_array(np.asarray(arr[chosen]), spec, preprocess, f"{path}")
    source = f"array file {path}: {len(chosen)} of {len(arr)} samples"
    return CalibrationSet({spec.name: x}, None, None, source)


def _load_npz(path: Path, specs: list[InputSpec], preprocess: Preprocess | None,
              num_classes: int | None, limit: int | None, seed: int) -> CalibrationSet:
    with _read_array(path) as npz:
        arrays = {name: _npz_member(npz, name, path) for name in _npz_input_keys(npz.files, specs, path)}
        label_key = _one_of(npz.files, _Y_KEYS, path)
        y = None if label_key is None else _npz_member(npz, label_key, path)
    n = _common_length(arrays, path)
    labels = None if y is None else _labels_array(y, n, num_classes, f"{path}[{label_key}]")
    chosen = _choose(labels, n, limit, seed)
    inputs = {spec.name: _prepare_array(arr[chosen], spec, preprocess, f"{path}[{key}]")
              for spec, (key, arr) in zip(specs, arrays.items())}
    return CalibrationSet(inputs, None if labels is None else labels[chosen], None,
                          f"array file {path}: {len(chosen)} of {n} samples")


def _npz_member(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"cannot read {path}[{key}]: {_oneline(exc)}") from exc


def _one_of(keys: list[str], wanted: tuple[str, ...], path: Path) -> str | None:
    found = [k for k in wanted if k in keys]
    if len(found) > 1:
        raise CalibrationDataError(f"{path} has both {found[0]!r} and {found[1]!r}; keep one")
    return found[0] if found else None


def _npz_input_keys(keys: list[str], specs: list[InputSpec], path: Path) -> list[str]:
    """The npz keys feeding ``specs``, in spec order: one per input name, else ``x``/``images``."""
    if all(s.name in keys for s in specs):
        return [s.name for s in specs]
    x_key = _one_of(keys, _X_KEYS, path)
    if len(specs) == 1 and x_key is not None:
        return [x_key]
    names = ", ".join(s.name for s in specs)
    raise CalibrationDataError(f"{path} needs an array named x or images, or one per model input ({names}); "
                               f"found: {', '.join(keys) or 'nothing'}")


def _check_samples(arr: np.ndarray, where: str) -> None:
    if arr.ndim == 0 or len(arr) == 0:
        raise CalibrationDataError(f"{where} holds no samples (shape {arr.shape})")


def _common_length(arrays: dict[str, np.ndarray], path: Path) -> int:
    for key, arr in arrays.items():
        _check_samples(arr, f"{path}[{key}]")
    lengths = {key: len(arr) for key, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise CalibrationDataError(f"{path}: arrays have different sample counts {lengths}")
    return next(iter(lengths.values()))


def _labels_array(y: np.ndarray, n: int, num_classes: int | None, where: str) -> np.ndarray:
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise CalibrationDataError(
            f"{where}: expected integer labels of shape ({n},), got {y.dtype} {y.shape}")
    labels = y.astype(np.int64)
    _check_labels(labels, num_classes, where)
    return labels


def _prepare_array(arr: np.ndarray, spec: InputSpec, preprocess: Preprocess | None, where: str) -> np.ndarray:
    """An array for ``spec``: image arrays go to the model's layout (normalised if uint8); others are cast."""
    if spec.is_image:
        return _prepare_image_array(arr, spec, preprocess, where)
    _check_shape(arr.shape, spec.shape, where, spec.name)
    return _cast(arr, spec, where)


def _prepare_image_array(arr: np.ndarray, spec: InputSpec, preprocess: Preprocess | None,
                         where: str) -> np.ndarray:
    channels = _image_channels(spec)
    if arr.ndim == 3 and channels == 1:
        arr = arr[..., None]
    nhwc = _as_nhwc(arr, spec, where)
    if arr.dtype == np.uint8 and spec.dtype.kind == "f":
        pre = preprocess or Preprocess(None, None, *_default_values(spec), bgr=False)
        _check_channels(spec, pre)
        return _to_model(_normalise(nhwc, pre), spec)
    return _cast(nhwc.transpose(0, 3, 1, 2) if spec.layout == "NCHW" else nhwc, spec, where)


def _as_nhwc(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """A rank-4 NCHW or NHWC array as NHWC, matching the model's channels and (known) size."""
    c, h, w = spec.channels, spec.height, spec.width
    expected = f"{_fmt_samples((c, h, w))} or {_fmt_samples((h, w, c))}"
    if arr.ndim != 4:
        raise CalibrationDataError(f"{where}: expected {expected} for input '{spec.name}', got {arr.shape}")
    fits = {layout: _fits(arr.shape[1:], dims) for layout, dims in
            (("NCHW", (c, h, w)), ("NHWC", (h, w, c)))}
    if fits[spec.layout]:
        layout = spec.layout
    elif any(fits.values()):
        layout = next(k for k, ok in fits.items() if ok)
    else:
        raise CalibrationDataError(f"{where}: expected {expected} for input '{spec.name}', got {arr.shape}")
    return arr.transpose(0, 2, 3, 1) if layout == "NCHW" else arr


def _fits(shape: tuple[int, ...], dims: tuple[int | None, ...]) -> bool:
    return all(d is None or d == s for s, d in zip(shape, dims))


def _check_shape(shape: tuple[int, ...], expected: tuple[int | None, ...] | None,
                 where: str, name: str) -> None:
    if expected is None:
        return
    if len(shape) != len(expected) or not _fits(shape[1:], expected[1:]):
        raise CalibrationDataError(
            f"{where}: expected shape {_fmt_samples(expected[1:])} for input '{name}', got {shape}")


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """Cast to the input's dtype where no information is lost in kind (float→int is refused)."""
    allowed = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(spec.dtype.kind, "")
    if arr.dtype.kind not in allowed:
        raise CalibrationDataError(f"{where}: expected {spec.dtype}-compatible data for input '{spec.name}', "
                                   f"got {arr.dtype}")
    if spec.dtype.kind in "iu" and arr.size:
        info = np.iinfo(spec.dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise CalibrationDataError(f"{where}: values [{arr.min()}, {arr.max()}] do not fit {spec.dtype}")
    return np.ascontiguousarray(arr, dtype=spec.dtype)
