"""Image helpers for looking at results: :class:`ImageGrid` tiles batches side by side (e.g. before / after)."""

from __future__ import annotations

from ..core.errors import FinetuneError
from ..training.plots import image_grid
from .base import CATEGORY, FTNode

ROWS = 4


class ImageGrid(FTNode):
    NODE_ID = "FinetuneImageGrid"
    DISPLAY_NAME = "Image Grid (Finetune)"
    CATEGORY = f"{CATEGORY}/images"
    DESCRIPTION = ("Tiles up to four image batches into one picture, one labelled row per batch: for example the base "
                   "model's samples above the trained model's, same prompt and seed. The inputs are not changed.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("One image: the rows on a white background, each labelled on the left.",)

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(2, ROWS + 1):
            optional[f"images_{i}"] = ("IMAGE", {"tooltip": f"Row {i} (optional)."})
            optional[f"label_{i}"] = ("STRING", {"default": "", "tooltip": f"Text on the left of row {i}."})
        return {"required": {"images_1": ("IMAGE", {"tooltip": "Row 1: a batch of images, laid out across."}),
                             "label_1": ("STRING", {"default": "", "tooltip": "Text on the left of row 1."})},
                "optional": optional}

    def run(self, images_1, label_1="", **rows):
        batches, labels = [images_1], [str(label_1 or "")]
        for i in range(2, ROWS + 1):
            if rows.get(f"images_{i}") is not None:
                batches.append(rows[f"images_{i}"])
                labels.append(str(rows.get(f"label_{i}") or ""))
        for i, b in enumerate(batches, 1):
            if getattr(b, "ndim", 0) != 4 or b.shape[-1] not in (1, 3, 4):
                raise FinetuneError(f"row {i} is not an image batch (got shape {tuple(getattr(b, 'shape', ()))})",
                                    node=self.NODE_ID, input=f"images_{i}",
                                    fix="connect an IMAGE output (e.g. from Sample or Load Image)")
        return (image_grid(batches, labels=labels),)


NODES = [ImageGrid]
