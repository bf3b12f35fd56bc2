"""Save nodes: write a trained LoRA, embedding or whole model into the models folders.

Each node confines the name to its folder, never overwrites unless asked (``name_2``, ``name_3`` ...), writes
atomically, and shows where the file went. Files land where the loaders look: models/loras, models/embeddings,
models/checkpoints and models/diffusers (ComfyUI's own folders inside ComfyUI).
"""

from __future__ import annotations

from .. import host
from ..core.families import check_family
from ..training.saving import (
    CHECKPOINT_FORMATS,
    LORA_LAYOUTS,
    SAVE_DTYPES,
    relative_name,
    safe_name,
    save_checkpoint,
    save_embedding,
    save_embedding_for,
    save_lora,
    target_path,
)
from .base import CATEGORY, EMBEDDING, LORA, PIPE, FTNode

_OVERWRITE_TIP = ("Replace a file of the same name. Off: the new file gets _2, _3 ... appended and the old one is "
                  "kept.")


def _name_tip(folder: str, example: str) -> str:
    return (f"File name inside models/{folder}; '/' makes sub-folders (e.g. {example}). The extension is added. "
            "Absolute paths and '..' are refused.")


def _report(folder_key: str, path, name: str, ext: str, notes: list[str] | None = None) -> dict:
    rel = relative_name(path, folder_key)
    wanted = safe_name(name, node=None, input=None)
    if ext and not wanted.lower().endswith(ext.lower()):
        wanted += ext
    lines = [f"saved {folder_key}/{rel}"]
    if rel != wanted:
        lines.append(f"('{wanted}' already exists and was kept; enable overwrite to replace it)")
    lines += notes or []
    host.log.info("[save] %s", "; ".join(lines))
    return {"ui": {"text": lines}, "result": ()}


class _SaveNode(FTNode):
    """Output nodes that write one file (or folder) and report it on the node."""

    CATEGORY = f"{CATEGORY}/save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    OUTPUT_TOOLTIPS = ()


class SaveLoRA(_SaveNode):
    NODE_ID = "FinetuneSaveLoRA"  # ComfyUI core has its own "SaveLoRA" node (nodes_train.py): never clash.
    DISPLAY_NAME = "Save LoRA (Finetune)"
    DESCRIPTION = ("Saves a LoRA as .safetensors in models/loras, in the kohya/A1111 layout that ComfyUI's "
                   "LoraLoader, A1111 and kohya read (or the diffusers/PEFT layout), with the training settings in "
                   "its metadata.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA to save (from a training node or AddLoRA's source)."}),
                "pipe": (PIPE, {"tooltip": "The model the LoRA was trained on: its family and UNet layout decide "
                                           "the key names written to the file."}),
                "name": ("STRING", {"default": "finetune/my_lora",
                                    "tooltip": _name_tip("loras", "finetune/my_lora")}),
                "layout": (list(LORA_LAYOUTS), {"default": "kohya",
                                                "tooltip": "kohya: lora_unet_/lora_te_ keys with alphas, read by "
                                                           "ComfyUI, A1111, kohya and diffusers. diffusers: PEFT keys "
                                                           "for diffusers' load_lora_weights."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": _OVERWRITE_TIP}),
            },
        }

    def run(self, lora, pipe, name, layout="kohya", overwrite=False):
        check_family("LoRA", lora.family, pipe.family, input="lora")  # before a folder is made for the file
        path = target_path("loras", name, ".safetensors", overwrite=bool(overwrite), node=self.NODE_ID,
                           input="name")
        v = pipe.base.prediction_type == "v_prediction"
        save_lora(lora, path, family=pipe.family, unet_config=dict(pipe.base.unet.config), layout=layout,
                  v_prediction=v)
        notes = []
        if layout == "diffusers" and lora.embeddings:
            # diffusers' load_lora_weights refuses keys it does not know, so the bundled words go beside the file,
            # as diffusers' advanced DreamBooth script writes them: <name>_emb.safetensors, which
            # pipe.load_textual_inversion reads (and ComfyUI / A1111 too, as an embedding file)
            widths = [int(te.config.hidden_size) for te in pipe.base.text_encoders]
            for emb in lora.embeddings.values():
                suffix = "_emb" if len(lora.embeddings) == 1 else f"_emb_{emb.name}"
                stem = relative_name(path, "loras").removesuffix(".safetensors")
                emb_path = target_path("loras", stem + suffix, ".safetensors", overwrite=bool(overwrite),
                                       node=self.NODE_ID, input="name")
                save_embedding(emb, emb_path, family=pipe.family, v_prediction=v, widths=widths,
                               metadata=emb.metadata)
                notes.append(f"the word '{emb.token or emb.name}' beside it: {emb_path.name}")
        return _report("loras", path, name, ".safetensors", notes)


class SaveEmbedding(_SaveNode):
    NODE_ID = "FinetuneSaveEmbedding"
    DISPLAY_NAME = "Save Embedding (Finetune)"
    DESCRIPTION = ("Saves a textual-inversion embedding as .safetensors in models/embeddings, in the layout ComfyUI "
                   "and A1111 both read. Use it in prompts as embedding:<name>.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding": (EMBEDDING, {"tooltip": "The embedding to save (from the textual-inversion trainer)."}),
                "pipe": (PIPE, {"tooltip": "The model the embedding was trained on: its family decides the file "
                                           "layout (one tensor for SD 1.x/2.x, clip_l + clip_g for SDXL)."}),
                "name": ("STRING", {"default": "finetune/my_embedding",
                                    "tooltip": _name_tip("embeddings", "finetune/my_embedding") + " The file name "
                                               "is the prompt word: embedding:<name>."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": _OVERWRITE_TIP}),
            },
        }

    def run(self, embedding, pipe, name, overwrite=False):
        path, word = save_embedding_for(embedding, pipe, name, overwrite=bool(overwrite), node=self.NODE_ID)
        return _report("embeddings", path, name, ".safetensors", [f"prompt word: {word}"])


class SaveCheckpoint(_SaveNode):
    NODE_ID = "FinetuneSaveCheckpoint"
    DISPLAY_NAME = "Save Checkpoint (Finetune)"
    DESCRIPTION = ("Saves the whole model (e.g. after DreamBooth), with the handle's LoRAs merged in, as a single "
                   ".safetensors in models/checkpoints (ComfyUI/A1111) or as a diffusers folder in models/diffusers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model to save: base weights plus its LoRAs, merged at their "
                                           "strengths. Embeddings are not included (save them separately)."}),
                "name": ("STRING", {"default": "finetune/my_model",
                                    "tooltip": "Name inside models/checkpoints (single_file) or models/diffusers "
                                               "(diffusers); '/' makes sub-folders. Absolute paths and '..' are "
                                               "refused."}),
                "format": (list(CHECKPOINT_FORMATS), {"default": "single_file",
                                                      "tooltip": "single_file: one .safetensors for ComfyUI's "
                                                                 "checkpoint loader and A1111. diffusers: a folder "
                                                                 "for diffusers' from_pretrained."}),
                "dtype": (list(SAVE_DTYPES), {"default": "fp16",
                                              "tooltip": "Precision of the saved weights. fp16: half the size, the "
                                                         "usual choice. fp32: exact copy of fp32 training weights."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": _OVERWRITE_TIP}),
            },
        }

    def run(self, pipe, name, format="single_file", dtype="fp16", overwrite=False):
        key, ext = ("checkpoints", ".safetensors") if format == "single_file" else ("diffusers", "")
        path = target_path(key, name, ext, overwrite=bool(overwrite), node=self.NODE_ID, input="name")
        save_checkpoint(pipe, path, format=format, dtype=dtype)
        notes = []
        if pipe.loras:
            notes.append("merged LoRAs: " + ", ".join(f"{p.lora.name} ({p.strength_unet:g}/{p.strength_text:g})"
                                                      for p in pipe.loras))
        if pipe.embeddings:
            notes.append("not included (save with Save Embedding): " + ", ".join(pipe.embeddings))
        return _report(key, path, name, ext, notes)


NODES = [SaveLoRA, SaveEmbedding, SaveCheckpoint]
