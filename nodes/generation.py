"""Generation nodes: LoadBase → AddLoRA → Sample (with NegativePrompt)."""

from __future__ import annotations

from .. import host
from ..core.conditioning import Negative
from ..core.errors import FinetuneError
from ..core.loading import DEFAULT_MODEL, DEVICES, DTYPES, available_models, load_base
from ..core.lora_handle import check_fits, lora_for_handle, with_lora
from ..core.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, SampleSettings, sample
from .base import CATEGORY, LORA, NEGATIVE, PIPE, FTNode, file_signature

NO_LORA = "None"




class LoadBase(FTNode):
    NODE_ID = "LoadBase"
    DISPLAY_NAME = "Load Base Model (Finetune)"
    CATEGORY = f"{CATEGORY}/models"
    DESCRIPTION = ("Loads a Stable Diffusion 1.x, 2.x, SDXL or Kolors base model: a single-file checkpoint from "
                   "models/checkpoints, a diffusers folder from models/diffusers, a Hugging Face hub id, or the "
                   "built-in models (shapes-tiny: a small pretrained model of a world of coloured shapes, 64x64 px; "
                   "demo-tiny and kolors-tiny: untrained). Loading the same model twice reuses the weights in "
                   "memory.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The model handle: base weights plus the LoRAs and embeddings added downstream.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (available_models(), {
                    "default": DEFAULT_MODEL,
                    "tooltip": "Checkpoint file (models/checkpoints), diffusers folder (models/diffusers) or a "
                               "built-in model: shapes-tiny (pretrained on coloured shapes; sample at 64x64), "
                               "demo-tiny (untrained) or kolors-tiny (an untrained Kolors, to try Kolors graphs).",
                }),
                "dtype": (list(DTYPES), {"default": "auto",
                                         "tooltip": "Weight precision. auto: bf16/fp16 on GPU, fp32 on CPU."}),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "Where the model runs. auto: GPU if any."}),
            },
            "optional": {
                "hub_id": ("STRING", {"default": "", "tooltip": "Optional Hugging Face id (e.g. "
                                      "stable-diffusion-v1-5/stable-diffusion-v1-5); overrides ckpt_name. Needs "
                                      "network the first time."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, ckpt_name, dtype="auto", device="auto", hub_id=""):
        path = host.resolve_model("checkpoints", ckpt_name) if isinstance(ckpt_name, str) else None
        return f"{ckpt_name}|{dtype}|{device}|{hub_id}|{file_signature(path)}"

    def run(self, ckpt_name, dtype="auto", device="auto", hub_id=""):
        return (load_base(ckpt_name, dtype, device, hub_id or ""),)


class AddLoRA(FTNode):
    NODE_ID = "AddLoRA"
    DISPLAY_NAME = "Add LoRA (Finetune)"
    CATEGORY = f"{CATEGORY}/models"
    DESCRIPTION = ("Adds a LoRA to the model handle, from a file in models/loras (kohya/A1111 or diffusers/PEFT "
                   "layout) or from a LoRA trained in this graph. Chain several. Embeddings bundled in the LoRA "
                   "(pivotal tuning's word, bundle_emb keys) come with it: their words work in prompts. The input "
                   "handle is not changed.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("A new handle: the input's base and patches plus this LoRA.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model handle to add the LoRA to."}),
                "lora_name": ([NO_LORA] + host.list_files("loras"), {
                    "default": NO_LORA, "tooltip": "LoRA file from models/loras. 'None' to use the lora input."}),
                "strength_unet": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                            "tooltip": "How strongly the LoRA changes the UNet. 0 = no effect."}),
                "strength_text": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                            "tooltip": "How strongly the LoRA changes the text encoder(s)."}),
            },
            "optional": {
                "lora": (LORA, {"tooltip": "A LoRA trained in this graph (Train LoRA / DreamBooth Train). Used "
                                           "together with lora_name if both are set."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name=NO_LORA, **_):
        path = host.resolve_model("loras", lora_name) if isinstance(lora_name, str) and lora_name != NO_LORA else None
        return f"{lora_name}|{file_signature(path)}"

    def __init__(self) -> None:
        self._loaded: tuple | None = None  # (key, LoraWeights, unmatched) of the last file, like LoraLoader

    def run(self, pipe, lora_name=NO_LORA, strength_unet=1.0, strength_text=1.0, lora=None):
        if lora_name in (None, "", NO_LORA) and lora is None:
            raise FinetuneError("no LoRA given", input="lora_name",
                                fix="pick a file in lora_name or connect a trained LoRA to the 'lora' input")
        out, notes = pipe, []
        if lora_name not in (None, "", NO_LORA):
            weights, unmatched = self._load_file(pipe, lora_name)
            if unmatched:
                notes.append(f"{lora_name}: {len(unmatched)} keys not applied (no such layer, or a part not applied): "
                             + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else ""))
                host.log.warning("[AddLoRA] %s", notes[-1])
            out = with_lora(out, weights, strength_unet, strength_text)
        if lora is not None:
            check_fits(lora, pipe, node=self.NODE_ID, input="lora")
            out = with_lora(out, lora, strength_unet, strength_text)
        if notes:
            return {"ui": {"text": notes}, "result": (out,)}
        return (out,)

    def _load_file(self, pipe, lora_name):
        path = host.resolve_model("loras", lora_name)
        if path is None:
            raise FinetuneError(f"LoRA '{lora_name}' was not found in models/loras", input="lora_name",
                                fix="put the file in models/loras and refresh, or pick another")
        key = (str(path), file_signature(path), id(pipe.base))
        if self._loaded is None or self._loaded[0] != key:
            weights, unmatched = lora_for_handle(path, pipe, node=self.NODE_ID, input="lora_name")
            self._loaded = (key, weights, unmatched)
        return self._loaded[1], self._loaded[2]


class NegativePrompt(FTNode):
    NODE_ID = "NegativePrompt"
    DISPLAY_NAME = "Negative Prompt (Finetune)"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = "What the image should not show. Encoded at sampling time by the (LoRA-patched) text encoders."
    RETURN_TYPES = (NEGATIVE,)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("The negative prompt, for Sample's negative input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {
            "multiline": True, "default": "blurry, low quality",
            "tooltip": "Negative prompt. Same syntax as the prompt: (word:1.2), (word), \\( \\), embedding:name."})}}

    def run(self, text):
        return (Negative(str(text)),)


class Sample(FTNode):
    NODE_ID = "Sample"
    DISPLAY_NAME = "Sample (Finetune)"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = ("Generates images from a prompt with the model handle and its LoRAs/embeddings. Output is a "
                   "standard IMAGE for SaveImage/PreviewImage. Same seed and settings give the same images.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Generated images, [batch, height, width, 3] floats 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model handle (LoadBase, AddLoRA, or a training node)."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of a red circle",
                                      "tooltip": "What to draw. (word:1.2) weights, (word) = x1.1, \\( \\) literal "
                                                 "brackets, embedding:name for textual inversions. Long prompts are "
                                                 "split into 75-token chunks."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed. Same seed and settings give the same images."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale. 1 = no guidance (faster)."}),
                "sampler_name": (list(SAMPLER_NAMES), {"default": "euler", "tooltip": "Sampler (ComfyUI names)."}),
                "scheduler": (list(SCHEDULER_NAMES), {"default": "normal", "tooltip": "Noise schedule."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8,
                                  "tooltip": "Image width in pixels (multiple of 8)."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8,
                                   "tooltip": "Image height in pixels (multiple of 8)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Images per run."}),
            },
            "optional": {
                "negative": (NEGATIVE, {"tooltip": "Negative prompt (NegativePrompt node). Empty if not connected."}),
            },
        }

    def run(self, pipe, prompt, seed, steps, cfg, sampler_name, scheduler, width, height, batch_size, negative=None):
        settings = SampleSettings(prompt=str(prompt), negative=negative.text if negative is not None else "",
                                  seed=int(seed), steps=int(steps), cfg=float(cfg), sampler=sampler_name,
                                  scheduler=scheduler, width=int(width), height=int(height),
                                  batch_size=int(batch_size))
        settings.validate(self.NODE_ID)
        with host.Progress(settings.steps, desc="Sample") as bar:
            images = sample(pipe, settings, progress=lambda i, n: bar.update(1), node=self.NODE_ID)
        return (images,)


NODES = [LoadBase, AddLoRA, NegativePrompt, Sample]
