"""Calibration data: load images or arrays from the user's domain as model-ready numpy arrays.

Sources
-------
* **Image folder with class subfolders** (torchvision ImageFolder convention): label = index of
  the folder in the sorted list of non-hidden subfolders; images are found recursively inside
  each. Empty class folders keep their index. A labels file changes the mapping: a text file
  with one folder name per line (line number = class index, from 0) or a JSON object
  ``{folder: index}``. Every class folder must be named in it and every name must be a folder.
  Labels taken from folder names are flagged (:attr:`CalibrationSet.labels_from_folders`): the
  folders may be a domain's own classes rather than the model's (the main job then drops them).
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

Memory: streamed, not held
--------------------------
Memory does not grow with the size of the set: :meth:`CalibrationSet.batches` produces the
samples one batch at a time, and every caller reads the set that way.

* **Image folders** are lazy. :func:`load_calibration` only scans the folder (file list, labels
  from folder names, the ``limit`` subset), checks the preprocessing against the model input and
  validates the files (below). Each batch is decoded and preprocessed when it is requested, in
  parallel threads, in file order; the result does not depend on the batch size or thread timing.
* **.npy** files are memory-mapped (``np.load(mmap_mode="r")``); each batch reads only its rows
  and is prepared (normalised, transposed, cast) then.
* **.npz** members cannot be memory-mapped (they are zip members, possibly compressed): the chosen
  samples are held in memory as stored (e.g. uint8 pixels, 4x smaller than the float32 the model
  gets) and prepared per batch. Use ``.npy`` for array sets that do not fit in memory.
* ``len()``, ``labels``, ``class_names``, ``source``, :meth:`CalibrationSet.split` and
  :meth:`CalibrationSet.subset` decode nothing. :attr:`CalibrationSet.inputs` materialises the
  whole set at once (decoding every image, on each access): for small sets and tests only.

Early validation, so that a broken set fails before any long work:

* Image folders: the header of every chosen file is checked with PIL (``Image.open`` +
  ``verify()``: the file must be an image PIL identifies, with a parsable header; for PNG every
  chunk CRC is checked too, so damaged or truncated PNGs are caught). Measured on the 10,000
  CIFAR-10 PNGs of ``shared/data/cifar10/train`` (2 shared cores): 0.07-0.09 ms per file with the
  files in the OS cache, 0.13-0.2 ms on a first read, i.e. about 1-2 s for 10,000 files (threads
  did not help); ~0.06-0.09 ms per JPEG of ``shared/data/hymenoptera`` (ImageNet-size photos, where
  a full decode costs ~1.3 ms). Then the first chosen image is decoded and preprocessed in full.
  Defects that only decoding reveals (a truncated JPEG or BMP, damaged JPEG data) are reported by
  ``batches()`` when their batch is reached, as the same one-line error naming the file.
* Arrays: shape, layout, dtype and channels of each whole array are checked, the first sample is
  prepared in full, and integer data for integer inputs is range-checked (in bounded chunks, only
  where the cast is not safe).

Bad input raises :class:`CalibrationDataError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    def default_for(cls, spec: InputSpec, size: tuple[int, int] | None = None) -> Preprocess:
        """The documented default for an image input (see module docstring), at ``size``
        (height, width) where the model's own is symbolic."""
        height, width = _target_size(spec, None if size is None else cls(None, size, 1.0, (0.0,), (1.0,), False))
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
                f"input '{spec.name}' has symbolic height/width {_fmt_shape(model)}: give the image size "
                f"(--input-shape {spec.name}=1x{spec.channels}xHxW or --crop N; in Python Preprocess(crop=(H, W), ...))")
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


class _Samples(Protocol):
    """Where a set's samples come from: ``take`` returns model-ready arrays for sample indices."""

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]: ...


class _Arrays:
    """Model-ready arrays held in memory (a :class:`CalibrationSet` built from a dict)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = {name: np.asarray(x) for name, x in arrays.items()}
        lengths = {name: len(x) for name, x in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise CalibrationDataError(f"calibration inputs need one common sample count, got {lengths or 'none'}")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {name: x[idx] for name, x in self.arrays.items()}


class _RawArrays:
    """Arrays as stored (memory-mapped ``.npy`` or in-memory ``.npz`` members), prepared per take."""

    def __init__(self, arrays: list[tuple[InputSpec, np.ndarray, str]], preprocess: Preprocess | None):
        self.arrays = arrays  # (spec, raw array, where for messages), in spec order
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.arrays[0][1])

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {spec.name: _prepare_array(np.asarray(raw[idx]), spec, self.preprocess, where)
                for spec, raw, where in self.arrays}

    def check(self, idx: np.ndarray) -> None:
        """Fail now on what would fail later: shape, layout, dtype and channels of each whole
        array, the first sample prepared in full, and integer data range-checked for integer
        inputs (in bounded chunks, only where the dtype cast is not safe)."""
        for spec, raw, where in self.arrays:
            _check_raw(raw, spec, self.preprocess, where)
        self.take(idx[:1])
        for spec, raw, where in self.arrays:
            if spec.dtype.kind in "iu" and raw.dtype.kind in "iu" and not np.can_cast(raw.dtype, spec.dtype):
                rows = max(1, (64 << 20) // max(1, raw[0].nbytes))
                for start in range(0, len(idx), rows):
                    _check_fits(np.asarray(raw[idx[start:start + rows]]), spec.dtype, where)


class _ImageFiles:
    """Image files, decoded and preprocessed (in threads) only when taken."""

    def __init__(self, files: list[Path], spec: InputSpec, pre: Preprocess, size: tuple[int, int]):
        self.files, self.spec, self.pre, self.size = files, spec, pre, size

    def __len__(self) -> int:
        return len(self.files)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {self.spec.name: _decode_all([self.files[i] for i in idx], self.spec, self.pre, self.size)}


class CalibrationSet:
    """Model-ready calibration samples (one array per model input) and optional integer labels.

    Samples are produced batch by batch by :meth:`batches`, the way to read a set: image folders
    are decoded per batch, ``.npy`` files are memory-mapped and sliced per batch, so memory does
    not grow with the size of the set (``.npz`` members are held in memory as stored, see
    :func:`load_calibration`). ``labels``, ``class_names``, ``len()``, :meth:`split` and
    :meth:`subset` never decode anything. ``CalibrationSet(inputs, labels, class_names, source)``
    with a dict of model-ready arrays gives an in-memory set.
    """

    def __init__(self, inputs: Mapping[str, np.ndarray] | _Samples, labels: np.ndarray | None,
                 class_names: list[str] | None, source: str, _index: np.ndarray | None = None,
                 labels_from_folders: bool = False):
        self._samples: _Samples = _Arrays(inputs) if isinstance(inputs, Mapping) else inputs
        self._index = np.arange(len(self._samples)) if _index is None else np.asarray(_index, dtype=np.int64)
        self.labels = labels  # int64 (N,) or None, aligned with the samples of this set
        self.class_names = class_names  # index -> name, when known
        self.source = source  # what was loaded and how, for the report
        # labels are the order of the sorted class folders (no labels file): maybe not the model's classes
        self.labels_from_folders = labels is not None and labels_from_folders
        if labels is not None and len(labels) != len(self._index):
            raise CalibrationDataError(f"{len(labels)} labels for {len(self._index)} samples")

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        labeled = "labeled" if self.labels is not None else "unlabeled"
        return f"CalibrationSet({len(self)} samples, {labeled}, source={self.source!r})"

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """All samples at once, input name -> (N, ...) in the model's layout and dtype.

        This materialises the whole set (an image folder is decoded in full, on every access): it
        is meant for small sets and tests. Use :meth:`batches` for anything that may be large.
        """
        return self._samples.take(self._index)

    def subset(self, idx: np.ndarray) -> CalibrationSet:
        """The samples at positions ``idx`` of this set (nothing is decoded or copied but indices)."""
        idx = np.asarray(idx, dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        return CalibrationSet(self._samples, labels, self.class_names, self.source, _index=self._index[idx],
                              labels_from_folders=self.labels_from_folders)

    def without_labels(self) -> CalibrationSet:
        """The same samples, unlabeled (nothing is decoded or copied but indices)."""
        return CalibrationSet(self._samples, None, self.class_names, self.source, _index=self._index)

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
        """Consecutive batches (the last may be smaller) of model-ready inputs and labels, decoded
        or read only as each batch is requested. A bad image raises :class:`CalibrationDataError`
        naming the file when its batch is reached."""
        if batch_size < 1:
            raise CalibrationDataError(f"batch_size must be at least 1, got {batch_size}")
        return self._batches(batch_size)

    def _batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            labels = None if self.labels is None else self.labels[part]
            yield self._samples.take(self._index[part]), labels


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


def load_calibration(path: str | Path | np.ndarray | Mapping[str, np.ndarray], specs: list[InputSpec],
                     preprocess: Preprocess | None = None,
                     labels_file: str | Path | None = None, num_classes: int | None = None,
                     limit: int | None = None, seed: int = 0) -> CalibrationSet:
    """Load an image folder, ``.npy`` or ``.npz`` (or the caller's arrays: one array for a
    single input, or arrays by input name with optional ``y``/``labels``, as an .npz holds them)
    as a :class:`CalibrationSet` for ``specs``.

    ``limit`` keeps at most that many samples: a deterministic (``seed``) random subset,
    class-balanced when labeled; only the chosen images are ever decoded. Nothing is decoded here
    beyond the first image (see "Memory" in the module docstring): read the set with
    :meth:`CalibrationSet.batches`.
    """
    if not specs:
        raise CalibrationDataError("the model has no inputs")
    if isinstance(path, np.ndarray):
        path = {_single_input(specs, "one array").name: path}
    if isinstance(path, Mapping):
        if labels_file is not None:
            raise CalibrationDataError("labels_file applies to image folders only")
        return _load_members({k: np.asarray(v) for k, v in path.items()}, "arrays", specs, preprocess, num_classes,
                             limit, seed)
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"calibration data not found: {path}")
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
    images = _ImageFiles([files[i] for i in chosen], spec, pre, size)
    for file in images.files:  # cheap header check of every chosen file (see module docstring)
        _verify_image(file)
    images.take(np.arange(1))  # the first image in full: decoding and preprocessing work end to end
    classes = "" if class_names is None else f", {len(class_names)} classes"
    source = f"image folder {path}: {len(chosen)} of {len(files)} images{classes} ({pre.describe()})"
    return CalibrationSet(images, None if labels is None else labels[chosen], class_names, source,
                          labels_from_folders=labels_file is None)


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
    """Decode and preprocess ``files`` (in parallel threads; PIL releases the GIL) into one array,
    in the order given (each image is decoded independently, so the result is deterministic)."""
    height, width = size
    out = np.empty((len(files), height, width, spec.channels), dtype=np.float32)
    mode = _IMAGE_MODES[spec.channels]

    def fill(i: int) -> None:
        out[i] = _normalise(_read_image(files[i], mode, pre, size), pre)

    workers = min(8, os.cpu_count() or 1, len(files))
    if workers <= 1:
        for i in range(len(files)):
            fill(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fill, range(len(files))))
    return _to_model(out, spec)


def _verify_image(path: Path) -> None:
    """Header check without decoding pixels: PIL identifies the file and parses its header;
    ``verify`` also checks the chunk CRCs of PNGs. Truncated JPEG/BMP data passes (found when decoded)."""
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as exc:
        raise CalibrationDataError(f"cannot read image {path}: {_oneline(exc)}") from exc


def _read_image(path: Path, mode: str, pre: Preprocess, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (H, W, C) after resize and crop."""
    try:
        with Image.open(path) as img:
            img = _resize_and_crop(img.convert(mode), pre.resize, size)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as exc:
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
    arr = _read_array(path, mmap=True)  # memory-mapped: batches read only their rows
    _check_samples(arr, f"{path}")
    chosen = _choose(None, len(arr), limit, seed)
    samples = _RawArrays([(spec, arr, f"{path}")], preprocess)
    samples.check(chosen)
    source = f"array file {path}: {len(chosen)} of {len(arr)} samples"
    return CalibrationSet(samples, None, None, source, _index=chosen)


def _load_npz(path: Path, specs: list[InputSpec], preprocess: Preprocess | None,
              num_classes: int | None, limit: int | None, seed: int) -> CalibrationSet:
    with _read_array(path) as npz:
        label_key = _one_of(npz.files, _Y_KEYS, path)
        wanted = _npz_input_keys(npz.files, specs, path) + ([] if label_key is None else [label_key])
        members = {key: _npz_member(npz, key, path) for key in wanted}  # only what feeds the model
    return _load_members(members, str(path), specs, preprocess, num_classes, limit, seed)


def _load_members(members: Mapping[str, np.ndarray], where: str, specs: list[InputSpec], preprocess: Preprocess | None,
                  num_classes: int | None, limit: int | None, seed: int) -> CalibrationSet:
    """Arrays by name (an .npz's members, or the caller's): one per input name (or ``x`` /
    ``images`` for a single input) and optionally ``y`` / ``labels``."""
    keys = list(members)
    arrays = {name: members[name] for name in _npz_input_keys(keys, specs, where)}
    label_key = _one_of(keys, _Y_KEYS, where)
    y = None if label_key is None else np.asarray(members[label_key])
    n = _common_length(arrays, where)
    labels = None if y is None else _labels_array(y, n, num_classes, f"{where}[{label_key}]")
    chosen = _choose(labels, n, limit, seed)
    # Keep the chosen samples in memory as stored (raw), and prepare (normalise, transpose, cast) per batch.
    raw = [(spec, arr if len(chosen) == n else arr[chosen], f"{where}[{key}]")
           for spec, (key, arr) in zip(specs, arrays.items())]
    del arrays
    samples = _RawArrays(raw, preprocess)
    samples.check(np.arange(len(chosen)))
    return CalibrationSet(samples, None if labels is None else labels[chosen], None,
                          f"{where}: {len(chosen)} of {n} samples")


def _npz_member(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"cannot read {path}[{key}]: {_oneline(exc)}") from exc


def _one_of(keys: list[str], wanted: tuple[str, ...], path: Path | str) -> str | None:
    found = [k for k in wanted if k in keys]
    if len(found) > 1:
        raise CalibrationDataError(f"{path} has both {found[0]!r} and {found[1]!r}; keep one")
    return found[0] if found else None


def _npz_input_keys(keys: list[str], specs: list[InputSpec], path: Path | str) -> list[str]:
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


def _common_length(arrays: dict[str, np.ndarray], path: Path | str) -> int:
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
    nhwc = arr.transpose(0, 2, 3, 1) if _array_layout(arr.shape, spec, where) == "NCHW" else arr
    if arr.dtype == np.uint8 and spec.dtype.kind == "f":
        pre = _array_preprocess(spec, preprocess)
        _check_channels(spec, pre)
        return _to_model(_normalise(nhwc, pre), spec)
    return _cast(nhwc.transpose(0, 3, 1, 2) if spec.layout == "NCHW" else nhwc, spec, where)


def _array_preprocess(spec: InputSpec, preprocess: Preprocess | None) -> Preprocess:
    """The value steps for uint8 pixel arrays: the user's, else the default scale/mean/std."""
    return preprocess or Preprocess(None, None, *_default_values(spec), bgr=False)


def _check_raw(arr: np.ndarray, spec: InputSpec, preprocess: Preprocess | None, where: str) -> None:
    """What :func:`_prepare_array` checks from shape, dtype and settings alone, on the whole
    array (reads no data, so a memory-mapped file is not touched)."""
    if not spec.is_image:
        _check_shape(arr.shape, spec.shape, where, spec.name)
        _check_kind(arr.dtype, spec, where)
        return
    shape = (*arr.shape, 1) if arr.ndim == 3 and _image_channels(spec) == 1 else arr.shape
    _array_layout(shape, spec, where)
    if arr.dtype == np.uint8 and spec.dtype.kind == "f":
        _check_channels(spec, _array_preprocess(spec, preprocess))
    else:
        _check_kind(arr.dtype, spec, where)


def _array_layout(shape: tuple[int, ...], spec: InputSpec, where: str) -> str:
    """Whether a rank-4 array is NCHW or NHWC, matching the model's channels and (known) size."""
    c, h, w = spec.channels, spec.height, spec.width
    expected = f"{_fmt_samples((c, h, w))} or {_fmt_samples((h, w, c))}"
    if len(shape) != 4:
        raise CalibrationDataError(f"{where}: expected {expected} for input '{spec.name}', got {shape}")
    fits = {layout: _fits(shape[1:], dims) for layout, dims in
            (("NCHW", (c, h, w)), ("NHWC", (h, w, c)))}
    if fits[spec.layout]:
        return spec.layout
    if any(fits.values()):
        return next(k for k, ok in fits.items() if ok)
    raise CalibrationDataError(f"{where}: expected {expected} for input '{spec.name}', got {shape}")


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
    _check_kind(arr.dtype, spec, where)
    if spec.dtype.kind in "iu":
        _check_fits(arr, spec.dtype, where)
    return np.ascontiguousarray(arr, dtype=spec.dtype)


def _check_kind(dtype: np.dtype, spec: InputSpec, where: str) -> None:
    allowed = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(spec.dtype.kind, "")
    if dtype.kind not in allowed:
        raise CalibrationDataError(f"{where}: expected {spec.dtype}-compatible data for input '{spec.name}', "
                                   f"got {dtype}")


def _check_fits(arr: np.ndarray, dtype: np.dtype, where: str) -> None:
    """Integer data must fit an integer input's dtype."""
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise CalibrationDataError(f"{where}: values [{arr.min()}, {arr.max()}] do not fit {dtype}")
