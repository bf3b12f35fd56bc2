"""Training-data nodes: a folder of images (+ .txt captions) or an IMAGE batch → FT_DATASET."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict
from pathlib import Path

from .. import host
from ..core.errors import FinetuneError
from ..training.data import (
    CAPTION_EXTENSION,
    IMAGE_EXTENSIONS,
    REPEAT_FOLDER,
    DataOptions,
    TrainingSet,
    from_image_batch,
    prepare,
    preview_grid,
    read_folder,
)
from .base import CATEGORY, FTNode, from_inputs, widgets

DATASET = "FT_DATASET"
EXAMPLE_TAG = "[example]"
EXAMPLE_ROOT = Path(__file__).resolve().parent.parent / "example_data"
# The options both training-data nodes offer (DataOptions fields), in widget order after each node's own inputs.
# Saved UI workflows store widget values by position: append, never reorder.
DATA_OPTIONS = ("resolution", "crop", "flip", "repeats", "caption_prefix", "caption_dropout", "bucketing")
# Options Training Data (Images) gained after it was published: optional there, so that workflows saved without them
# (UI and API format) still run, with the default.
IMAGES_ADDED_OPTIONS = ("bucketing",)


# ---------------------------------------------------------------------------------------------- folders
def example_datasets() -> list[str]:
    """Names of the bundled example datasets (folders under ``example_data/``)."""
    if not EXAMPLE_ROOT.is_dir():
        return []
    return sorted(p.name for p in EXAMPLE_ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _refuse(name: str, why: str, node: str, input: str) -> FinetuneError:
    return FinetuneError(f"'{name}' {why}", node=node, input=input,
                         fix=f"give a folder name inside the input folder {host.input_dir()} (e.g. 'my_dog'), or a "
                             f"bundled example such as '{EXAMPLE_TAG} red-circle'")


def find_dataset_folder(name: str, *, node: str = "FinetuneTrainingData", input: str = "folder") -> Path:
    """Resolve a ``folder`` input: a folder inside the host's input directory, or ``[example] <name>``.

    Absolute paths, ``~``, ``..`` and links leading out of the input directory are refused: a shared workflow
    must not read files outside the folders the ComfyUI owner configured.
    """
    text = (name or "").strip() if isinstance(name, str) else ""
    if not text:
        raise _refuse(name, "is empty", node, input)
    if not host.usable_name(text):
        raise _refuse(name[:60] + ("..." if len(name) > 60 else ""), "has control characters or is too long",
                      node, input)
    if text.startswith(EXAMPLE_TAG):
        example = text[len(EXAMPLE_TAG):].strip()
        if example not in example_datasets():
            known = ", ".join(f"'{EXAMPLE_TAG} {n}'" for n in example_datasets()) or "none installed"
            raise FinetuneError(f"there is no bundled example dataset '{example}'", node=node, input=input,
                                fix=f"use one of {known}")
        return EXAMPLE_ROOT / example
    if os.path.isabs(text) or text.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", text):
        raise _refuse(name, "is an absolute path; workflows may only read folders inside the input folder",
                      node, input)
    parts = Path(text.replace("\\", "/")).parts
    if ".." in parts:
        raise _refuse(name, "uses '..'; workflows may only read folders inside the input folder", node, input)
    root = host.input_dir()
    try:
        path = (root / Path(*parts)).resolve()
        path.relative_to(root.resolve())
    except ValueError:
        raise _refuse(name, "is a link that leads outside the input folder", node, input) from None
    except OSError as exc:
        raise _refuse(name, f"cannot be looked up ({exc.strerror or exc})", node, input) from None
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else f"was not found in the input folder {root}"
        raise FinetuneError(f"'{name}' {what}", node=node, input=input,
                            fix=f"create the folder {root / Path(*parts)} with your training images (and .txt "
                                f"captions), or use a bundled example such as '{EXAMPLE_TAG} red-circle'")
    return path


def folder_signature(folder: Path) -> str:
    """Hash of the image/caption files (names, mtimes, sizes) in ``folder`` and its kohya repeat folders."""
    digest = hashlib.sha256()
    folders = [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and REPEAT_FOLDER.match(p.name))
    for sub in folders:
        for p in sorted(sub.iterdir()):
            if p.suffix.lower() in (*IMAGE_EXTENSIONS, CAPTION_EXTENSION) and p.is_file():
                st = p.stat()
                digest.update(f"{p.relative_to(folder).as_posix()}|{st.st_mtime_ns}|{st.st_size}\n".encode())
    return digest.hexdigest()


def data_options(values: dict) -> DataOptions:
    """The options from a training-data node's inputs; values pass unchanged (prepare validates them)."""
    return from_inputs(DataOptions, values, coerce=False)


def _summary(node: str, ds: TrainingSet) -> None:
    sizes = ", ".join(f"{w}x{h}: {len(idx)}" for (w, h), idx in ds.buckets.items())
    host.log.info("[%s] %d images (%d per epoch with repeats), sizes %s", node, len(ds), ds.epoch_size, sizes)
    if ds.missing_captions:
        host.log.info("[%s] %d of %d images have no caption", node, ds.missing_captions, len(ds))


# ---------------------------------------------------------------------------------------------- nodes
class TrainingData(FTNode):
    NODE_ID = "FinetuneTrainingData"
    DISPLAY_NAME = "Training Data (Folder)"
    CATEGORY = f"{CATEGORY}/training"
    DESCRIPTION = ("Reads a folder of training images from ComfyUI's input folder, each with an optional caption "
                   "in a .txt file of the same name (kohya style; '<repeats>_<name>' sub-folders are read too). "
                   "Images are resized and cropped to the training resolution, or grouped by aspect ratio with "
                   "bucketing. Re-runs when files in the folder change.")
    RETURN_TYPES = (DATASET, "IMAGE")
    RETURN_NAMES = ("dataset", "preview")
    OUTPUT_TOOLTIPS = ("The prepared images and captions, for the training nodes.",
                       "A grid of up to 16 prepared images, to check crops before training.")

    @classmethod
    def INPUT_TYPES(cls):
        examples = ", ".join(f"'{EXAMPLE_TAG} {n}'" for n in example_datasets())
        bundled = f" Bundled examples: {examples}." if examples else ""
        return {
            "required": {
                "folder": ("STRING", {"default": f"{EXAMPLE_TAG} red-circle",
                                      "tooltip": "Folder name inside ComfyUI's input folder, e.g. 'my_dog' for "
                                                 "input/my_dog. Absolute paths and '..' are refused." + bundled}),
                **widgets(DATA_OPTIONS, DataOptions),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        try:
            return folder_signature(find_dataset_folder(folder))
        except (FinetuneError, OSError):
            return float("nan")  # always re-run; run() then reports the problem

    def run(self, folder, resolution=512, crop="center", flip=False, repeats=1, caption_prefix="",
            caption_dropout=0.0, bucketing=False):
        options = data_options(locals())
        path = find_dataset_folder(folder, node=self.NODE_ID)
        raw = read_folder(path, max_short_side=2 * int(resolution), node=self.NODE_ID)
        ds = prepare(raw, **asdict(options), node=self.NODE_ID)
        _summary(self.NODE_ID, ds)
        return (ds, preview_grid(ds))


class TrainingDataFromImages(FTNode):
    NODE_ID = "FinetuneTrainingDataFromImages"
    DISPLAY_NAME = "Training Data (Images)"
    CATEGORY = f"{CATEGORY}/training"
    DESCRIPTION = ("Makes a training dataset from an IMAGE batch (e.g. Load Image or a batch node) and captions "
                   "typed here: one per line, or a single line for every image.")
    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The prepared images and captions, for the training nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The training images, one batch (all the same size)."}),
                "captions": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "One caption per line, in image order, or one line for all "
                                                   "images. Blank lines are ignored; leave empty for no captions."}),
                **widgets([n for n in DATA_OPTIONS if n not in IMAGES_ADDED_OPTIONS], DataOptions),
            },
            "optional": widgets(IMAGES_ADDED_OPTIONS, DataOptions),
        }

    def run(self, images, captions="", resolution=512, crop="center", flip=False, repeats=1, caption_prefix="",
            caption_dropout=0.0, bucketing=False):
        options = data_options(locals())
        lines = [line.strip() for line in (captions or "").splitlines() if line.strip()]
        ds = from_image_batch(images, lines, **asdict(options), node=self.NODE_ID)
        _summary(self.NODE_ID, ds)
        return (ds,)


NODES = [TrainingData, TrainingDataFromImages]
