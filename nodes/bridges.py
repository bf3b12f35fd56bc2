"""Bridges between this pack's types and ComfyUI's native graphs.

* :class:`ApplyLoRAToModel`: an ``FT_LORA`` (trained in the graph) onto ComfyUI's own MODEL and CLIP, through the
  host's LoRA patching (``comfy.sd.load_lora_for_models``, what ``LoraLoader`` calls), so native KSampler graphs can
  use it. Only works inside ComfyUI (host.apply_lora_to_native).
* :class:`EmbeddingToPrompt`: saves an ``FT_EMBEDDING`` into models/embeddings and outputs the prompt word
  ``embedding:<name>`` for native ``CLIPTextEncode`` prompts (works headless too: our own prompts read the same
  syntax).
* :class:`NativeLoRAToFinetune`: ComfyUI's own trained LoRA (``LORA_MODEL`` from ``TrainLoraNode``, a dict of
  ``diffusion_model.<LDM path>.lora_up.weight`` / ``lora_down.weight`` / ``alpha`` tensors) as an ``FT_LORA`` for
  AddLoRA, SaveLoRA and the rest of the pack.
* :class:`NativeModelToPipe`: ComfyUI's own MODEL + CLIP + VAE (Load Checkpoint, with LoraLoader patches) as an
  ``FT_PIPE`` over the host's tensors (core.native), so the pack's trainers train the graph's own model.
"""

from __future__ import annotations

import re
from collections import Counter

from .. import host
from ..core.errors import FinetuneError
from ..core.handle import ModelHandle
from ..core.loading import DEVICES
from ..core.lora import LoraModule, parse_lora, to_kohya_state_dict
from ..core.lora_handle import _targets, check_fits
from ..core.native import base_from_native, shared_fraction
from ..training.saving import relative_name, safe_name, save_embedding_for
from .base import CATEGORY, EMBEDDING, LORA, PIPE, FTNode

BRIDGE_CATEGORY = f"{CATEGORY}/bridges"
NATIVE_LORA = "LORA_MODEL"  # ComfyUI's own type (comfy_extras/nodes_train.py), not ours: not namespaced

_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
# What ComfyUI's tokenizer reads as part of an embedding name: it cuts at whitespace, parses ( ) as weights and
# strips a trailing comma; this pack's prompt parser also stops at commas. Such names would not resolve.
_PROMPT_BREAKING = re.compile(r"[\s(),\\]")


# ============================================================================================== FT_LORA -> MODEL/CLIP

class ApplyLoRAToModel(FTNode):
    NODE_ID = "FinetuneApplyLoRAToModel"
    DISPLAY_NAME = "Apply Finetune LoRA to MODEL/CLIP"
    CATEGORY = BRIDGE_CATEGORY
    DESCRIPTION = ("Applies a LoRA trained in this graph (FT_LORA) to ComfyUI's own MODEL and CLIP, exactly as the "
                   "native Load LoRA node does, so KSampler and CLIPTextEncode graphs can use it. Load the same "
                   "checkpoint twice: with Load Checkpoint (MODEL/CLIP) and with Load Base Model (the pipe the LoRA "
                   "was trained on). The inputs are not changed; every LoRA layer must apply, otherwise the node "
                   "stops with the list of layers ComfyUI could not place. Needs ComfyUI (not the headless runner).")
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA applied (a patched copy; for KSampler).",
                       "The text encoder(s) with the LoRA applied (a patched copy; for CLIPTextEncode).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "ComfyUI's diffusion model (e.g. from Load Checkpoint) of the same "
                                               "checkpoint the LoRA was trained on."}),
                "clip": ("CLIP", {"tooltip": "ComfyUI's CLIP of that checkpoint (from the same Load Checkpoint)."}),
                "lora": (LORA, {"tooltip": "The LoRA trained in this graph (Train LoRA, DreamBooth, or ComfyUI "
                                           "LoRA → Finetune LoRA)."}),
                "pipe": (PIPE, {"tooltip": "The model handle the LoRA was trained on (Load Base Model of the same "
                                           "checkpoint). Only its family and UNet layout are used: they decide the "
                                           "LoRA key names ComfyUI expects. Its weights are not touched."}),
                "strength_model": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the LoRA changes the diffusion "
                                                                     "model. 0 = no effect; may be negative."}),
                "strength_clip": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the LoRA changes the text "
                                                                    "encoder(s). 0 = no effect; may be negative."}),
            },
        }

    def run(self, model, clip, lora, pipe, strength_model=1.0, strength_clip=1.0):
        check_fits(lora, pipe, node=self.NODE_ID, input="lora")
        # the words a LoRA bundles (pivotal tuning) are prompt-level: ComfyUI's LoRA loader reads no bundle_emb
        # keys, its prompts take them as embedding files (Embedding → Prompt Word)
        state_dict, _ = to_kohya_state_dict(lora, family=pipe.family, unet_config=dict(pipe.base.unet.config),
                                            bundle=False)
        if lora.embeddings:
            host.log.info("[FinetuneApplyLoRAToModel] the LoRA bundles the word(s) %s: save them with Finetune "
                          "Embedding → Prompt Word to use them in CLIPTextEncode", ", ".join(lora.embeddings))
        state_dict = {k: v.detach() for k, v in state_dict.items()}
        new_model, new_clip = host.apply_lora_to_native(model, clip, state_dict, float(strength_model),
                                                        float(strength_clip))
        return (new_model, new_clip)


# ============================================================================================== FT_EMBEDDING -> prompt

class EmbeddingToPrompt(FTNode):
    NODE_ID = "FinetuneEmbeddingToPrompt"
    DISPLAY_NAME = "Finetune Embedding → Prompt Word"
    CATEGORY = BRIDGE_CATEGORY
    DESCRIPTION = ("Saves a textual-inversion embedding into models/embeddings (the layout ComfyUI and A1111 read) "
                   "and outputs its prompt word, embedding:<name>, for ComfyUI's own CLIPTextEncode. Join it with "
                   "your prompt text using the core 'Concatenate' node (string_a = your text, string_b = this word, "
                   "delimiter = a space) and connect the result to CLIPTextEncode's text input. The word also works "
                   "in this pack's Sample and Negative Prompt nodes. It must follow a space or start the prompt.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_word",)
    OUTPUT_TOOLTIPS = ("embedding:<saved name>: the prompt word for CLIPTextEncode (or Sample). Concatenate it "
                       "with your text, separated by a space.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding": (EMBEDDING, {"tooltip": "The embedding to use in native prompts (from Learn "
                                                     "Embedding)."}),
                "pipe": (PIPE, {"tooltip": "The model the embedding was trained on: its family decides the file "
                                           "layout (one tensor for SD 1.x/2.x, clip_l + clip_g for SDXL)."}),
                "name": ("STRING", {"default": "",
                                    "tooltip": "File name inside models/embeddings; '/' makes sub-folders. Empty: "
                                               "the embedding's own name. No spaces, parentheses or commas (they "
                                               "break the prompt word). The extension is added."}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          "tooltip": "Replace a file of the same name. Off: the new file gets _2, "
                                                     "_3 ... appended, the old one is kept, and the prompt word "
                                                     "names the new file."}),
            },
        }

    def run(self, embedding, pipe, name="", overwrite=False):
        wanted = str(name or "").strip() or str(getattr(embedding, "name", "") or "")
        if not wanted:
            raise FinetuneError("the embedding has no name", input="name", fix="type a file name, e.g. my_concept")
        rel = safe_name(wanted, node=self.NODE_ID, input="name")
        bad = sorted(set(_PROMPT_BREAKING.findall(rel)))
        if bad:
            shown = " ".join("space" if ch.isspace() else ch for ch in bad)
            raise FinetuneError(f"the name {rel!r} contains {shown}, which ends an embedding:<name> word in a prompt",
                                input="name", fix="use letters, digits, '-', '_', '.' and '/' only, e.g. my_concept")
        path, word = save_embedding_for(embedding, pipe, rel, overwrite=bool(overwrite), node=self.NODE_ID)
        lines = [f"saved embeddings/{relative_name(path, 'embeddings')}", f"prompt word: {word}"]
        host.log.info("[FinetuneEmbeddingToPrompt] %s", "; ".join(lines))
        return {"ui": {"text": lines}, "result": (word,)}


# ============================================================================================== LORA_MODEL -> FT_LORA

def native_lora_to_weights(lora_sd, pipe, *, node: str = "NativeLoRAToFinetune", input: str = "lora"):
    """ComfyUI's ``LORA_MODEL`` dict → ``(LoraWeights, notes)`` for ``pipe``'s model.

    Keys are read with :func:`core.lora.parse_lora` (ComfyUI-generic ``diffusion_model.<LDM path>`` names, and any
    other layout it knows). Conv factors stored flat (ComfyUI trains ``down [r, in*k*k]``, ``up [out, r]``) are
    reshaped to the kohya LoCon form (``[r, in, k, k]`` / ``[out, r, 1, 1]``). LoHa / LoKr factors and ComfyUI's
    full-weight ``.diff``/``.diff_b`` deltas (its trainer's norm weights and biases) come along as those modules.
    ``notes`` says what was converted and lists the keys that were not (OFT parts, keys that match no module).
    """
    import torch  # noqa: PLC0415

    if not isinstance(lora_sd, dict) or not lora_sd:
        raise FinetuneError("the LoRA is empty or not ComfyUI's LORA_MODEL (a dict of tensors)", node=node,
                            input=input, fix="connect the 'lora' output of ComfyUI's Train LoRA node")
    device = pipe.base.device
    tensors, skipped = {}, []
    for key, value in lora_sd.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value.detach().to(device=device, copy=True)
        else:
            skipped.append(str(key))
    unet_modules, te_modules = _targets(pipe)
    try:
        weights, unmatched = parse_lora(tensors, None, family=pipe.family, unet_config=dict(pipe.base.unet.config),
                                        unet_modules=unet_modules, te_modules=te_modules, name="comfyui_lora")
    except FinetuneError as exc:
        raise FinetuneError(exc.detail, node=node, input=input,
                            fix="connect the pipe of the checkpoint ComfyUI trained the LoRA on") from exc
    unmatched = skipped + unmatched
    if not weights.modules:
        raise FinetuneError(f"none of the LoRA's {len(lora_sd)} keys matches a layer of this {pipe.family.label} "
                            f"model (e.g. {', '.join(unmatched[:3])})", node=node, input=input,
                            fix="use ComfyUI's Train LoRA (algorithm LoRA, LoHa or LoKr; OFT cannot be converted) "
                                "on the same checkpoint as the pipe")
    shapes = {"unet": unet_modules, **{f"te{i + 1}": m for i, m in enumerate(te_modules)}}
    for key, module in list(weights.modules.items()):
        target = tuple(shapes.get(key[0], {}).get(key[1]) or ())
        if isinstance(module, LoraModule) and len(target) == 4 and module.down.ndim == 2 and module.mid is None:
            rank = module.rank
            weights.modules[key] = LoraModule(module.down.reshape(rank, *target[1:]),
                                              module.up.reshape(module.up.shape[0], rank, 1, 1), module.alpha,
                                              bias=module.bias)
    weights.family = pipe.family

    kinds = Counter(m.kind for m in weights.modules.values())
    done = [f"{kinds.pop('lora', 0)} LoRA layers"] + [f"{n} {k} layers" for k, n in sorted(kinds.items())
                                                      if k != "diff"]
    if kinds.get("diff"):
        done.append(f"{kinds['diff']} full-weight/bias deltas (.diff/.diff_b)")
    notes = ["converted " + ", ".join(done)]
    others = list(unmatched)
    if others:
        notes.append(f"not converted: {len(others)} keys that match no layer of this model: "
                     + ", ".join(others[:8]) + (" ..." if len(others) > 8 else ""))
    return weights, notes


class NativeLoRAToFinetune(FTNode):
    NODE_ID = "NativeLoRAToFinetune"
    DISPLAY_NAME = "ComfyUI LoRA → Finetune LoRA"
    CATEGORY = BRIDGE_CATEGORY
    DESCRIPTION = ("Converts a LoRA trained by ComfyUI's own Train LoRA node (LORA_MODEL) into this pack's LoRA "
                   "(FT_LORA), for Add LoRA, Save LoRA and the rest of the pack. Its layers (LoRA, LoHa, LoKr and "
                   "the norm/bias deltas) are matched against the pipe's model; keys that do not convert (OFT "
                   "parts, other models' layers) are listed on the node.")
    RETURN_TYPES = (LORA,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The LoRA as FT_LORA: connect it to Add LoRA's 'lora' input (or Save LoRA).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (NATIVE_LORA, {"tooltip": "The 'lora' output of ComfyUI's Train LoRA node (algorithm "
                                                  "LoRA)."}),
                "pipe": (PIPE, {"tooltip": "Load Base Model of the checkpoint ComfyUI trained the LoRA on: its "
                                           "layers decide where each LoRA key goes."}),
            },
        }

    def run(self, lora, pipe):
        weights, notes = native_lora_to_weights(lora, pipe, node=self.NODE_ID, input="lora")
        if len(notes) > 1:
            host.log.warning("[NativeLoRAToFinetune] %s", "; ".join(notes))
        return {"ui": {"text": notes}, "result": (weights,)}


# ========================================================================================== MODEL/CLIP/VAE -> FT_PIPE

class NativeModelToPipe(FTNode):
    NODE_ID = "FinetuneNativeModelToPipe"
    DISPLAY_NAME = "ComfyUI MODEL/CLIP/VAE → Finetune Pipe"
    CATEGORY = BRIDGE_CATEGORY
    DESCRIPTION = ("Turns ComfyUI's own MODEL, CLIP and VAE (Load Checkpoint, also after Load LoRA) into this pack's "
                   "pipe, so Train LoRA, Learn Embedding and DreamBooth train the model the graph already loaded. "
                   "No second copy: the pipe reads ComfyUI's weights in place, except the weights a Load LoRA "
                   "patches, which it holds patched (what KSampler sees). Training never changes ComfyUI's "
                   "weights. SD 1.x, SD 2.x (v-prediction read from the model) and SDXL; the weights keep "
                   "ComfyUI's dtype. Needs ComfyUI (not the headless runner).")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The model as FT_PIPE for the pack's trainers, Sample and Add LoRA. Apply what you train to "
                       "the same MODEL/CLIP with Apply Finetune LoRA to MODEL/CLIP.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "ComfyUI's diffusion model (Load Checkpoint, optionally through Load "
                                               "LoRA): SD 1.x, SD 2.x or SDXL."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (optionally through the same Load "
                                             "LoRA). CLIP Set Last Layer is honoured for SD 1.x/2.x."}),
                "vae": ("VAE", {"tooltip": "The VAE to encode training images and decode samples with (usually the "
                                           "checkpoint's)."}),
                "device": (list(DEVICES), {"default": "auto",
                                           "tooltip": "Where the pipe computes. auto: ComfyUI's device. Weights "
                                                      "already there are shared with ComfyUI; on another device "
                                                      "they are copied there once (e.g. to the GPU)."}),
            },
        }

    def run(self, model, clip, vae, device="auto"):
        import torch  # noqa: PLC0415 - heavy at start-up

        with torch.inference_mode(False):
            parts = host.native_model_parts(model, clip, vae)
            base, notes = base_from_native(parts, str(device), node=self.NODE_ID)
        patched = parts.get("patched") or {}
        groups = [(parts["unet"], patched.get("unet")), (parts["vae"], patched.get("vae")),
                  *zip(parts["text_encoders"], patched.get("text_encoders") or [[]] * len(parts["text_encoders"]))]
        host_tensors = [t for tensors, skip in groups for k, t in tensors.items() if k not in set(skip or ())]
        shared, own = shared_fraction([base.unet, base.vae, *base.text_encoders], host_tensors)
        mib = 1 << 20
        lines = [f"{base.family.label}, {parts['prediction_type']}, {str(base.dtype).replace('torch.', '')} on "
                 f"{base.device.type}", f"shared with ComfyUI: {shared / mib:.0f} MiB; held by the pipe: "
                 f"{own / mib:.0f} MiB", *notes]
        host.log.info("[%s] %s", self.NODE_ID, "; ".join(lines))
        return {"ui": {"text": lines}, "result": (ModelHandle(base),)}


NODES = [ApplyLoRAToModel, EmbeddingToPrompt, NativeLoRAToFinetune, NativeModelToPipe]
