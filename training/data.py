"""Training data: image folders and IMAGE batches turned into bucketed, augmented batches.

Plain Python (torch, numpy, PIL); no ComfyUI import, so it tests like any library.

The path from files to batches:

1. :func:`read_folder` reads ``<folder>/*.png|jpg|...`` with optional same-stem ``.txt`` captions (the kohya
   convention) into :class:`RawExample` s. Images go through :func:`load_image_file`, which fixes EXIF
   orientation, transparency, 16-bit and CMYK so that every image arrives as 8-bit RGB.
2. :func:`prepare` (or :func:`from_image_batch` for a ComfyUI IMAGE tensor) resizes each image to cover its
   target size (``resolution``², or with ``bucketing`` the aspect-ratio bucket from :func:`make_buckets` closest
   to the image's shape) and returns an immutable :class:`TrainingSet`.
3. :meth:`TrainingSet.batches` yields :class:`Batch` es forever: one bucket per batch, shuffled per epoch, with
   random crop / flip / caption dropout applied, all reproducible from one seed.

Kohya-style repeat folders are supported: sub-folders named ``<repeats>_<name>`` (``10_dog``) are read too and
their images repeat ``<repeats>`` times per epoch (multiplied by the ``repeats`` setting). Other sub-folders are
ignored.
"""

from __future__ import annotations

import io
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ..core.errors import FinetuneError
from ..core.fields import node_input

log = logging.getLogger("comfy_finetune")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "10_dog" = the images in it, 10 times per epoch
CropMode = Literal["center", "random"]
CROPS = ("center", "random")
Size = tuple[int, int]  # (width, height)

_FOLDER_FIX = ("put .png/.jpg/.webp images (each with an optional same-name .txt caption) directly in the folder, "
               "or in kohya-style '<repeats>_<name>' sub-folders such as '10_dog'")


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True, eq=False)
class RawExample:
    """One image as read from disk: 8-bit RGB, its caption (``None`` if it has none) and its file name.

    ``repeats`` comes from a kohya ``<repeats>_<name>`` folder (1 otherwise).
    """

    image: Image.Image
    caption: str | None
    name: str
    repeats: int = 1


@dataclass(frozen=True, eq=False)
class Example:
    """One prepared image: ``pixels`` [3, h, w] float32 in [-1, 1] on the CPU.

    Without random crop ``pixels`` is already the final training size; with random crop it is the image scaled
    to cover its target size and is cropped at batch time. ``caption_given`` is False when the caption is the
    default (no caption file / empty line), so training nodes can report it.
    """

    pixels: torch.Tensor = field(repr=False)
    caption: str
    name: str
    caption_given: bool
    repeats: int = 1


@dataclass(frozen=True, eq=False)
class Batch:
    """What :meth:`TrainingSet.batches` yields: ``pixels`` [B, 3, h, w] float32 in [-1, 1], all from one bucket."""

    indices: list[int]
    pixels: torch.Tensor
    captions: list[str]
    flipped: list[bool]
    step: int = 0
    epoch: int = 0


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Prepared examples plus the settings that turn them into batches. Immutable; share it freely.

    ``buckets`` maps a target size (w, h) to the indices of the examples trained at that size. Without
    bucketing there is one bucket, ``(resolution, resolution)``.
    """

    examples: tuple[Example, ...]
    resolution: int
    flip: bool = False
    random_crop: bool = False
    repeats: int = 1
    caption_prefix: str = ""
    caption_dropout: float = 0.0
    buckets: Mapping[Size, list[int]] = field(default_factory=dict)
    bucketing: bool = False
    _size_of: tuple[Size, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        size_of: list[Size | None] = [None] * len(self.examples)
        for size, indices in self.buckets.items():
            for i in indices:
                size_of[i] = size
        if not self.buckets:  # built by hand without buckets: everything is resolution²
            size_of = [(self.resolution, self.resolution)] * len(self.examples)
            object.__setattr__(self, "buckets", {(self.resolution, self.resolution): list(range(len(self.examples)))})
        if any(s is None for s in size_of):
            raise ValueError("every example must be in exactly one bucket")
        object.__setattr__(self, "_size_of", tuple(size_of))

    def signature(self) -> list:
        """What identifies the set in run keys (checkpoint names): names, captions and pixel checksums."""
        return [[ex.name, ex.caption, float(ex.pixels.double().sum())] for ex in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{w}x{h}: {len(idx)}" for (w, h), idx in self.buckets.items())
        return (f"TrainingSet({len(self)} images, buckets {{{sizes}}}, resolution={self.resolution}, "
                f"flip={self.flip}, random_crop={self.random_crop}, repeats={self.repeats}, "
                f"caption_prefix={self.caption_prefix!r}, caption_dropout={self.caption_dropout})")

    # ------------------------------------------------------------------------------------------ summary
    @property
    def epoch_size(self) -> int:
        """Examples per epoch, repeats included."""
        return sum(self._times(i) for i in range(len(self.examples)))

    @property
    def missing_captions(self) -> int:
        """How many examples had no caption of their own (they use the default caption)."""
        return sum(not ex.caption_given for ex in self.examples)

    def size_of(self, i: int) -> Size:
        """Training size (w, h) of example ``i``."""
        return self._size_of[i]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch for ``batch_size`` (each bucket rounds up on its own)."""
        batch_size = _check_batch_size(batch_size)
        return sum(math.ceil(sum(self._times(i) for i in idx) / batch_size) for idx in self.buckets.values() if idx)

    def _times(self, i: int) -> int:
        return self.repeats * self.examples[i].repeats

    # ------------------------------------------------------------------------------------------ sampling
    def caption(self, i: int, rng: random.Random) -> str:
        """Caption of example ``i`` with the prefix, or ``""`` with probability ``caption_dropout``.

        Always draws exactly one number from ``rng`` so the stream does not depend on the dropout value.
        """
        drop = rng.random() < self.caption_dropout
        if drop:
            return ""
        return join_caption(self.caption_prefix, self.examples[i].caption)

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield batches forever, deterministically for ``seed``.

        Every epoch lists each example ``repeats`` times (times its folder repeats), shuffles each bucket, cuts it
        into batches of ``batch_size`` (a short last batch is padded by re-drawing examples of the same bucket)
        and shuffles the batch order. Crop, flip and caption dropout of batch ``n`` depend only on
        ``(seed, n)``; ``start_step`` skips the first batches cheaply (to resume a run with the same order).
        """
        batch_size = _check_batch_size(batch_size)
        step, epoch = 0, 0
        while True:
            plan = self._epoch_plan(batch_size, seed, epoch)
            for indices in plan:
                if step >= start_step:
                    yield self._make_batch(indices, seed, step, epoch)
                step += 1
            epoch += 1

    def _epoch_plan(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        rng = random.Random(f"comfy-finetune-order-{seed}-{epoch}")
        plan: list[list[int]] = []
        for size in sorted(self.buckets):
            members = self.buckets[size]
            if not members:
                continue
            pool = [i for i in members for _ in range(self._times(i))]
            rng.shuffle(pool)
            for start in range(0, len(pool), batch_size):
                chunk = pool[start:start + batch_size]
                while len(chunk) < batch_size:  # pad from the same bucket, preferring examples not yet in it
                    fresh = [i for i in members if i not in chunk]
                    chunk.append(rng.choice(fresh or members))
                plan.append(chunk)
        rng.shuffle(plan)
        return plan

    def _make_batch(self, indices: list[int], seed: int, step: int, epoch: int) -> Batch:
        rng = random.Random(f"comfy-finetune-augment-{seed}-{step}")
        tiles, captions, flipped = [], [], []
        for i in indices:
            w, h = self._size_of[i]
            px = self.examples[i].pixels
            if px.shape[-2:] != (h, w):  # random crop (the image covers (w, h); crop a window of that size)
                top = rng.randint(0, px.shape[-2] - h)
                left = rng.randint(0, px.shape[-1] - w)
                px = px[:, top:top + h, left:left + w]
            flip = self.flip and rng.random() < 0.5
            if flip:
                px = px.flip(-1)
            tiles.append(px)
            flipped.append(flip)
            captions.append(self.caption(i, rng))
        return Batch(indices=list(indices), pixels=torch.stack(tiles).contiguous(), captions=captions,
                     flipped=flipped, step=step, epoch=epoch)


def subset(dataset: TrainingSet, indices: Sequence[int]) -> TrainingSet:
    """The examples ``indices`` of ``dataset`` (in that order) with the same settings and their buckets."""
    where = {old: new for new, old in enumerate(indices)}
    buckets = {size: [where[i] for i in members if i in where] for size, members in dataset.buckets.items()}
    return replace(dataset, examples=tuple(dataset.examples[i] for i in indices),
                   buckets={k: v for k, v in buckets.items() if v})


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise FinetuneError(f"batch size must be at least 1, got {batch_size}", input="batch_size",
                            fix="use a batch size of 1 or more")
    return int(batch_size)


def join_caption(prefix: str, caption: str) -> str:
    """``prefix`` + ``caption`` separated by one space (``"ohwx," + "a dog"`` → ``"ohwx, a dog"``).

    With no caption the prefix alone is returned, without a trailing comma (``"ohwx,"`` → ``"ohwx"``).
    """
    prefix, caption = prefix.strip(), caption.strip()
    if prefix and caption:
        return f"{prefix} {caption}"
    return caption or prefix.rstrip(", ")


# ---------------------------------------------------------------------------------------------- images
def load_image_file(path: str | Path, *, max_short_side: int | None = None, node: str | None = None,
                    input: str = "folder") -> Image.Image:
    """Read an image file as 8-bit RGB, upright.

    EXIF orientation is applied; an embedded colour profile is converted to sRGB; transparency (RGBA, LA, palette
    with a transparent colour) is composited over white; 16-bit images are scaled (65535 → 255), not clipped; CMYK
    is converted. Animated files give their first frame. With ``max_short_side`` larger images are shrunk (JPEG via
    the decoder's draft mode) so that their short side is ``max_short_side``; smaller ones are left alone.

    Raises:
        FinetuneError: the file is missing, corrupt or not an image (names the file).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if max_short_side and img.format == "JPEG":
                k = max_short_side / min(img.size)
                if k < 0.5:
                    img.draft(None, (math.ceil(img.width * k), math.ceil(img.height * k)))
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = to_rgb(_to_srgb(upright))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        reason = "not an image, or a format Pillow cannot read" if isinstance(exc, UnidentifiedImageError) \
            else str(exc).replace("\n", " ")
        raise FinetuneError(f"cannot read image '{path.name}' in {path.parent} ({reason})",
                            node=node, input=input,
                            fix=f"re-save '{path.name}' as PNG or JPEG, or remove it from the folder") from exc
    if max_short_side and min(rgb.size) > max_short_side:
        k = max_short_side / min(rgb.size)
        size = (max(max_short_side, round(rgb.width * k)), max(max_short_side, round(rgb.height * k)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb


def _to_srgb(img: Image.Image) -> Image.Image:
    """Convert an RGB/RGBA/CMYK image with an embedded colour profile (Display P3, Adobe RGB, ...) to sRGB.

    Untagged images are assumed sRGB already. A profile LittleCMS cannot use leaves the image as it is.
    """
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"),
                                         outputMode="RGBA" if img.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        log.debug("ignoring an unusable colour profile", exc_info=True)
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha over white, 16-bit/int/float greys scaled, CMYK and palettes converted."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in img.info) \
        or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit / 32-bit int / float grey array to uint8 (PIL's own convert clips 16-bit at 255)."""
    a = arr.astype(np.float64)
    if mode == "F":
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0  # float images are 0..1 or 0..255
        a = np.nan_to_num(a) * scale
    elif mode.startswith("I;16") or (a.size and a.max() > 255):  # "I" holds 16-bit PNG/TIFF data in practice
        a = np.clip(a, 0, 65535) / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- folders
def read_caption(path: Path) -> str | None:
    """A caption file as one line: UTF-8 (BOM stripped), UTF-16 with BOM, else latin-1; whitespace collapsed.

    An empty file counts as no caption (``None``).
    """
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    text = " ".join(text.replace("\ufeff", "").split())
    return text or None


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()),
                  key=lambda p: p.name)


def _caption_for(image: Path, captions: dict[str, Path]) -> str | None:
    exact = image.with_suffix(CAPTION_EXTENSION).name
    path = captions.get(exact) or captions.get(exact.casefold())
    return read_caption(path) if path is not None else None


def _read_images(folder: Path, prefix: str, repeats: int, max_short_side: int | None, node: str,
                 input: str) -> list[RawExample]:
    captions: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() == CAPTION_EXTENSION and p.is_file():
            captions[p.name] = p
            captions.setdefault(p.name.casefold(), p)
    out = []
    for path in _image_files(folder):
        img = load_image_file(path, max_short_side=max_short_side, node=node, input=input)
        out.append(RawExample(img, _caption_for(path, captions), prefix + path.name, repeats))
    return out


def read_folder(folder: str | Path, *, max_short_side: int | None = None, node: str | None = None,
                input: str = "folder") -> list[RawExample]:
    """Read every image in ``folder`` (sorted by file name) with its optional same-stem ``.txt`` caption.

    Sub-folders are read only when named kohya-style ``<repeats>_<name>``; their examples are named
    ``<sub-folder>/<file>`` and carry ``repeats``. ``max_short_side`` shrinks large images while reading
    (see :func:`load_image_file`) to keep memory down.

    Raises:
        FinetuneError: the folder does not exist, holds no image, or an image cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f"folder '{folder}' does not exist", node=node, input=input,
                            fix="create it and put the training images in it, or pick another folder")
    examples = _read_images(folder, "", 1, max_short_side, node, input)
    skipped = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name):
        match = REPEAT_FOLDER.match(sub.name)
        if match is None or int(match.group(1)) < 1:
            skipped.append(sub.name)
            continue
        examples += _read_images(sub, sub.name + "/", int(match.group(1)), max_short_side, node, input)
    if skipped:
        log.info("%signored sub-folders of %s (not '<repeats>_<name>'): %s", f"[{node}] " if node else "", folder,
                 ", ".join(skipped))
    if not examples:
        hint = f" (sub-folders {', '.join(skipped[:5])} were not read)" if skipped else ""
        raise FinetuneError(f"no images found in folder '{folder}'{hint}", node=node, input=input, fix=_FOLDER_FIX)
    return examples


# ---------------------------------------------------------------------------------------------- buckets
def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """Aspect-ratio buckets (w, h): sides multiples of ``step``, area ≈ ``resolution``², w/h within ``max_ratio``.

    ``step`` is lowered to 8 when ``resolution`` < 256 so tiny test resolutions still get several buckets. The
    square bucket is ``resolution`` rounded down to ``step``. Sorted from tallest to widest.
    """
    if resolution < 256:
        step = min(step, 8)
    area = resolution * resolution
    square = max(step, resolution // step * step)
    buckets = {(square, square)}
    width = square + step
    while width <= resolution * math.sqrt(max_ratio) + step:
        height = int(area // width) // step * step
        if height >= step and width / height <= max_ratio + 1e-9:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda s: (s[0] / s[1], s))


def closest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest ``size``'s (compared in log space)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def cover_size(size: Size, target: Size) -> Size:
    """Smallest scale of ``size`` that covers ``target`` (keeps the aspect ratio; both sides ≥ target)."""
    k = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * k)), max(target[1], round(size[1] * k))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32)  # [h, w, 3] 0..255
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _fit(img: Image.Image, target: Size, random_crop: bool) -> torch.Tensor:
    """Resize ``img`` to cover ``target``; center-crop it unless the crop is random (done at batch time)."""
    w, h = cover_size(img.size, target)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if not random_crop:
        left, top = (w - target[0]) // 2, (h - target[1]) // 2
        img = img.crop((left, top, left + target[0], top + target[1]))
    return _to_tensor(img)


# ---------------------------------------------------------------------------------------------- prepare
@dataclass(frozen=True)
class DataOptions:
    """How images become training examples: the keywords of :func:`prepare` and :func:`from_image_batch`, whose
    defaults are these (resolution aside: they have none). Each field is also a widget of both training-data nodes."""

    resolution: int = node_input(512, min=8, max=4096, step=8,
                                 tooltip="Training size in pixels: 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL. "
                                         "Images are scaled so their short side fits, then cropped.")
    crop: str = node_input("center", choices=CROPS,
                           tooltip="center: crop every image once around its middle. random: a new crop each time "
                                   "the image is used (more variety, may cut off the subject).")
    flip: bool = node_input(False, tooltip="Mirror images left-right half of the time. Good for styles; turn off for "
                                           "text, logos or asymmetric subjects.")
    repeats: int = node_input(1, min=1, max=1000, tooltip="How many times each image is used per epoch. Raise it for "
                                                          "small datasets.")
    caption_prefix: str = node_input("", tooltip="Put in front of every caption, e.g. a trigger word like 'ohwx' or "
                                                 "'ohwx style,'. Joined with a space.")
    caption_dropout: float = node_input(0.0, min=0.0, max=1.0, step=0.01,
                                        tooltip="Chance of training an image with an empty caption (0.05-0.1 helps "
                                                "the model work without the trigger word). 0 = never.")
    bucketing: bool = node_input(False, tooltip="Group images by aspect ratio and train each group at its own size "
                                                "(area about resolution²) instead of cropping all to a square. "
                                                "Recommended for SDXL.")


def _validate(resolution: int, crop: str, repeats: int, caption_dropout: float, node: str) -> None:
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise FinetuneError(f"resolution must be a multiple of 8 and at least 8, got {resolution}", node=node,
                            input="resolution", fix="use 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL")
    if resolution > 4096:
        raise FinetuneError(f"resolution {resolution} is larger than 4096 pixels", node=node, input="resolution",
                            fix="use 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL")
    if crop not in ("center", "random"):
        raise FinetuneError(f"unknown crop '{crop}'", node=node, input="crop", fix="use 'center' or 'random'")
    if not isinstance(repeats, int) or repeats < 1:
        raise FinetuneError(f"repeats must be at least 1, got {repeats}", node=node, input="repeats",
                            fix="use 1 to see each image once per epoch, more to repeat it")
    if not 0.0 <= caption_dropout <= 1.0:
        raise FinetuneError(f"caption dropout must be between 0 and 1, got {caption_dropout}", node=node,
                            input="caption_dropout",
                            fix="use 0 (never drop) up to 1 (always drop); 0.05-0.1 is common")


def prepare(raw: Sequence[RawExample], *, resolution: int, crop: CropMode = "center", flip: bool = False,
            repeats: int = 1, caption_prefix: str = "", caption_dropout: float = 0.0, bucketing: bool = False,
            default_caption: str = "", node: str | None = None) -> TrainingSet:
    """Resize and crop raw examples into a :class:`TrainingSet`.

    Args:
        raw: examples from :func:`read_folder` (or built by hand).
        resolution: training side in pixels (multiple of 8); with ``bucketing`` the area is about resolution².
        crop: ``"center"`` crops now; ``"random"`` keeps the covering image and crops each batch.
        flip: mirror images horizontally with probability 0.5 per batch.
        repeats: times each image is seen per epoch (multiplies kohya folder repeats).
        caption_prefix: put in front of every caption (e.g. a trigger word).
        caption_dropout: probability of training a sample with an empty caption.
        bucketing: group images by aspect ratio (:func:`make_buckets`) instead of cropping all to a square.
        default_caption: caption for images without one (may be empty).
        node: node named in errors.
    """
    if isinstance(resolution, float) and resolution.is_integer():
        resolution = int(resolution)
    _validate(resolution, crop, repeats, caption_dropout, node)
    if not raw:
        raise FinetuneError("the dataset has no images", node=node, input="folder", fix=_FOLDER_FIX)
    candidates = make_buckets(resolution) if bucketing else [(resolution, resolution)]
    random_crop = crop == "random"
    examples, buckets = [], {}
    for i, item in enumerate(raw):
        target = closest_bucket(item.image.size, candidates)
        buckets.setdefault(target, []).append(i)
        given = bool(item.caption and item.caption.strip())
        examples.append(Example(pixels=_fit(to_rgb(item.image), target, random_crop),
                                caption=" ".join(item.caption.split()) if given else default_caption.strip(),
                                name=item.name, caption_given=given, repeats=max(1, int(item.repeats))))
    return TrainingSet(examples=tuple(examples), resolution=resolution, flip=bool(flip), random_crop=random_crop,
                       repeats=repeats, caption_prefix=caption_prefix.strip(), caption_dropout=float(caption_dropout),
                       buckets=dict(sorted(buckets.items())), bucketing=bool(bucketing))


def from_image_batch(images: torch.Tensor, captions: Sequence[str | None] = (), *, resolution: int,
                     crop: CropMode = "center", flip: bool = False, repeats: int = 1, caption_prefix: str = "",
                     caption_dropout: float = 0.0, bucketing: bool = False, default_caption: str = "",
                     node: str | None = None) -> TrainingSet:
    """A :class:`TrainingSet` from a ComfyUI IMAGE tensor [B, H, W, 3] (float 0..1).

    ``captions`` has one entry per image, a single entry for all, or none; empty entries count as no caption.
    A 4th (alpha) channel is composited over white.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FinetuneError(f"expected an IMAGE tensor [B, H, W, 3], got {shape}", node=node, input="images",
                            fix="connect an IMAGE output such as Load Image")
    if images.ndim == 3:
        images = images[None]
    count = images.shape[0]
    if count == 0:
        raise FinetuneError("the IMAGE batch is empty: there are no images to train on", node=node, input="images",
                            fix="connect a node that outputs at least one image (e.g. LoadImage)")
    captions = list(captions)
    if len(captions) not in (0, 1, count):
        raise FinetuneError(f"got {len(captions)} captions for {count} images", node=node, input="captions",
                            fix=f"write one caption per line ({count} lines) or a single line used for every image")
    if len(captions) == 1:
        captions = captions * count
    elif not captions:
        captions = [None] * count
    arr = (images.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    raw = []
    for i in range(count):
        pic = arr[i]
        if pic.shape[-1] == 1:
            img = Image.fromarray(pic[..., 0], "L")
        elif pic.shape[-1] == 4:
            img = Image.fromarray(pic, "RGBA")
        else:
            img = Image.fromarray(pic, "RGB")
        raw.append(RawExample(to_rgb(img), (captions[i] or None), f"image_{i + 1:03}"))
    return prepare(raw, resolution=resolution, crop=crop, flip=flip, repeats=repeats, caption_prefix=caption_prefix,
                   caption_dropout=caption_dropout, bucketing=bucketing, default_caption=default_caption, node=node)


def preview_grid(dataset: TrainingSet, count: int = 16, cell: int = 128, columns: int = 4) -> torch.Tensor:
    """Up to ``count`` examples as one IMAGE [1, H, W, 3] (0..1): a grid of cells, each image fitted on grey."""
    picks = list(range(min(count, len(dataset))))
    cols = max(1, min(columns, len(picks)))
    rows = max(1, math.ceil(len(picks) / cols))
    canvas = torch.full((rows * cell, cols * cell, 3), 0.5)
    for n, i in enumerate(picks):
        px = dataset.examples[i].pixels
        w, h = dataset.size_of(i)
        top, left = (px.shape[-2] - h) // 2, (px.shape[-1] - w) // 2
        px = px[:, top:top + h, left:left + w]  # center view of a random-crop example
        k = cell / max(w, h)
        tw, th = max(1, round(w * k)), max(1, round(h * k))
        small = torch.nn.functional.interpolate(px[None], size=(th, tw), mode="bilinear", antialias=True,
                                                align_corners=False)[0]
        y = (n // cols) * cell + (cell - th) // 2
        x = (n % cols) * cell + (cell - tw) // 2
        canvas[y:y + th, x:x + tw] = ((small.permute(1, 2, 0) + 1.0) / 2.0).clamp(0, 1)
    return canvas[None].contiguous()
