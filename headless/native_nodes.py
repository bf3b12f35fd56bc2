"""Headless stand-ins for ComfyUI's ``LoadImage``, ``SaveImage`` and ``PreviewImage`` (``nodes.py``).

Same node ids, input names, return types and file conventions as core, so example workflows run headless:
IMAGE is ``[B, H, W, 3]`` float32 0..1 on the CPU, MASK ``[B, H, W]`` = 1 - alpha; saved files are
``<prefix>_<counter:05>_.png`` with the counter from ``folder_paths.get_save_image_path``. Only used by the headless
runner: they are never registered in ComfyUI, which has its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from .. import host
from ..core.atomic import atomic_write
from ..core.errors import FinetuneError
from ..training.saving import safe_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")
_ANNOTATIONS = {"[output]": host.output_dir, "[input]": host.input_dir, "[temp]": host.temp_dir}


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def annotated_path(name: str) -> Path:
    """``folder_paths.get_annotated_filepath``: ``"x.png [output]"`` lives in the output folder, else input.

    Raises :class:`FinetuneError` for names that would leave that folder (``..``, absolute paths, links out).
    """
    if not isinstance(name, str):
        raise FinetuneError(f"the image name is {name!r}, not text", node="LoadImage", input="image",
                            fix="give the file name of an image in the input folder, e.g. 'photo.png'")
    if not host.usable_name(name.strip() or "x"):
        raise FinetuneError(f"the image name {name[:60]!r} has control characters or is too long", node="LoadImage",
                            input="image", fix="give the file name of an image in the input folder, e.g. "
                                               "'photo.png'")
    base = host.input_dir
    text = name.strip()
    for tag, folder in _ANNOTATIONS.items():
        if text.endswith(tag):
            text, base = text[: -len(tag)].rstrip(), folder
            break
    root = base()
    path = root / text
    if not text or os.path.isabs(text) or ".." in Path(text.replace("\\", "/")).parts or not _inside(root, path):
        raise FinetuneError(f"'{name}' points outside the folder {root}", node="LoadImage", input="image",
                            fix=f"put the image inside {root} and give its name relative to that folder")
    return path


def _pil_to_tensors(img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of ``img`` as IMAGE [B,H,W,3] and MASK [B,H,W], as ``LoadImage.load_image`` does."""
    images, masks = [], []
    size = None
    for frame in ImageSequence.Iterator(img):
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        if size is None:
            size = rgb.size
        if rgb.size != size:  # frames of another size are skipped, like core
            continue
        images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None,])
        if "A" in frame.getbands():
            alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
            masks.append((1.0 - torch.from_numpy(alpha))[None,])
        elif frame.mode == "P" and "transparency" in frame.info:
            alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
            masks.append((1.0 - torch.from_numpy(alpha))[None,])
        else:
            masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
        if img.format == "MPO":
            break
    if len(images) > 1 and img.format not in ("MPO",):
        return torch.cat(images, dim=0), torch.cat(masks, dim=0)
    return images[0], masks[0]


class LoadImage:
    """Load an image from the input folder: IMAGE [1,H,W,3] and MASK [1,H,W] (1 - alpha)."""

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        root = host.input_dir()
        files = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
            if root.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True, "tooltip": "Image file in the input folder."})}}

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = annotated_path(image)
        if not path.is_file():
            raise FinetuneError(f"image '{image}' not found in {path.parent}", node="LoadImage", input="image",
                                fix="copy the file into the input folder or pick an existing one")
        try:
            with Image.open(path) as img:
                return _pil_to_tensors(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            # PIL's UnidentifiedImageError (not an image / unknown format), "image file is truncated", ...
            raise FinetuneError(f"image '{image}' ({path}) is not a readable image: {exc}", node="LoadImage",
                                input="image", fix="re-save the file as PNG or JPEG, or pick another image") from exc

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        """Hash of the file, so editing the image re-runs the node (``LoadImage.IS_CHANGED``)."""
        digest = hashlib.sha256()
        with open(annotated_path(image), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | FinetuneError:
        """Any existing file is accepted, annotated names included (no combo check, like core).

        A failure is returned as a :class:`FinetuneError` naming input ``image`` and the fix (ComfyUI shows any
        non-True verdict as text; the headless executor keeps the input and the fix).
        """
        try:
            path = annotated_path(image)
        except FinetuneError as exc:
            return exc
        if not path.is_file():
            return FinetuneError(f"Invalid image file: {image} (not found in {path.parent})", node="LoadImage",
                                 input="image", fix="copy the file into the input folder or pick an existing one")
        return True


def save_image_path(prefix: str, root: Path, width: int, height: int) -> tuple[Path, str, int, str]:
    """``folder_paths.get_save_image_path``: (folder, file stem, next counter, subfolder).

    ``%width%``, ``%height%``, ``%year%`` ... are expanded; the counter is one more than the highest
    ``<stem>_NNNNN_`` already in the folder. Prefixes leaving ``root`` raise :class:`FinetuneError`.
    """
    if "%" in prefix:
        now = time.localtime()
        for key, value in {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
                           "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
                           "second": f"{now.tm_sec:02}"}.items():
            prefix = prefix.replace(f"%{key}%", str(value))

    # Same rules as every other name from a workflow: no '..', absolute paths, control or Windows-invalid
    # characters, device names or over-long names (ComfyUI itself only checks the folder).
    prefix = safe_name(prefix, node="SaveImage", input="filename_prefix", where="the output folder")
    norm = os.path.normpath(prefix)
    subfolder, stem = os.path.dirname(norm), os.path.basename(norm)
    folder = root / subfolder
    if os.path.isabs(subfolder) or not stem or not _inside(root, folder):
        raise FinetuneError(f"'{prefix}' would save outside the output folder {root}", input="filename_prefix",
                            fix="use a plain name or a sub-folder path without '..' or a leading '/'")
    folder.mkdir(parents=True, exist_ok=True)
    highest = 0
    for name in os.listdir(folder):  # map_filename: "<stem>_<digits>_..." with the same (normcase) stem
        if os.path.normcase(name[:len(stem)]) != os.path.normcase(stem) or name[len(stem):len(stem) + 1] != "_":
            continue
        digits = name[len(stem) + 1:].split("_")[0]
        if digits.isdigit():
            highest = max(highest, int(digits))
    return folder, stem, highest + 1, subfolder.replace(os.sep, "/")


def _write_png_atomic(img: Image.Image, folder: Path, stem: str, counter: int, metadata: PngInfo | None,
                      compress_level: int) -> tuple[str, int]:
    """Write ``<stem>_<counter:05>_.png`` atomically, never over an existing file: when another writer took that
    name first, the next counter is used. Returns the name and the counter written."""
    def name(n: int) -> Path:
        return folder / f"{stem}_{n:05}_.png"

    def next_name(_taken: Path) -> Path:
        nonlocal counter
        counter += 1
        return name(counter)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            img.save(f, format="PNG", pnginfo=metadata, compress_level=compress_level)

    path = atomic_write(name(counter), write, overwrite=False, next_name=next_name)
    return path.name, counter


class SaveImage:
    """Save images as PNG in the output folder, with the prompt and workflow embedded (``nodes.SaveImage``)."""

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    folder_type = "output"
    compress_level = 4

    def folder(self) -> Path:
        return host.output_dir()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "File name prefix; "
                                                            "may hold a sub-folder, e.g. 'runs/cat'."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict:
        if images.ndim == 3:
            images = images[None]
        root = self.folder()
        root.mkdir(parents=True, exist_ok=True)
        try:
            folder, stem, counter, subfolder = save_image_path(filename_prefix, root, images.shape[2],
                                                               images.shape[1])
        except FinetuneError as exc:
            raise exc.with_node(type(self).__name__) from None
        results = []
        for batch_number, image in enumerate(images):
            array = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
            img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
            metadata = PngInfo()
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                metadata.add_text(key, json.dumps(value))
            name, counter = _write_png_atomic(img, folder, stem.replace("%batch_num%", str(batch_number)), counter,
                                              metadata, self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Save into the temp folder as ``ComfyUI_temp_<5 random letters>_NNNNN_.png`` (``nodes.PreviewImage``)."""

    folder_type = "temp"
    compress_level = 1

    def __init__(self) -> None:
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    def folder(self) -> Path:
        return host.temp_dir()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to preview."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict:
        return super().save_images(images, filename_prefix + self.prefix_append, prompt, extra_pnginfo)


NATIVE_NODE_CLASSES: dict[str, type] = {"LoadImage": LoadImage, "SaveImage": SaveImage,
                                        "PreviewImage": PreviewImage}
