"""The host's own model (ComfyUI's MODEL / CLIP / VAE) as this pack's :class:`~.handle.BaseModel`, sharing its tensors.

What ComfyUI holds for an SD 1.x / 2.x / SDXL checkpoint (``host.native_model_parts`` reads it out):

- the UNet under LDM/SGM module names (``input_blocks.1.1.proj_in.weight`` ...): the ``model.diffusion_model.*``
  part of a single-file checkpoint without its prefix;
- the VAE under LDM names (``encoder.down.0.block.0.conv1.weight`` ...), its mid-block attention ``q/k/v/proj_out``
  as 1x1 convolutions ``[C, C, 1, 1]``;
- each text encoder under Hugging Face CLIP names (``text_model.encoder.layers.0.self_attn.q_proj.weight`` ...,
  ``text_projection.weight`` a Linear weight ``[projection, hidden]``): ComfyUI renames OpenCLIP checkpoints
  (SD 2.x, SDXL's bigG) to these names when it loads them.

:func:`modules_from_native` builds the diffusers / transformers modules on the meta device from configs read off
the tensor shapes (the rules of :mod:`.ldm`) and assigns the host's tensors under the diffusers names: UNet and
text-encoder weights are the very same memory, the VAE attention weights ``[C, C]`` views of the ``[C, C, 1, 1]``
convolutions. Nothing is copied. :func:`base_from_native` adds tokenizers and the noise schedule.

ComfyUI creates its weights under ``torch.inference_mode()``. Such inference tensors (their views and ``detach()``
too) can never be saved for backward, so no gradient could pass a layer that reads one. :func:`plain_alias` makes
an ordinary tensor over the same storage (``Tensor.set_`` onto storage, offset, size and stride, outside inference
mode): same memory, usable by autograd.

Nothing here writes into the tensors: training puts peft layers beside the frozen weights, :meth:`ModelHandle.patched`
swaps ``param.data`` and puts the original tensor back, full DreamBooth trains deep copies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import FinetuneError
from .families import Family, default_scheduler_config, info
from .handle import BaseModel
from .ldm import (
    _infer_text_config,
    _infer_unet_config,
    _infer_vae_config,
    _strip_text_model,
    invert,
    is_vae_conv_as_linear,
    rename_keys,
    text_model_prefix,
    unet_name_map,
    vae_name_map,
)
from .loading import resolve_device
from .tokenizer import find_clip_tokenizer

__all__ = ["NATIVE_FAMILIES", "plain_alias", "modules_from_native", "base_from_native", "shared_fraction"]

NATIVE_FAMILIES = (Family.SD1, Family.SD2, Family.SDXL)
_FIX_FAMILY = "connect the MODEL, CLIP and VAE of an SD 1.x, SD 2.x or SDXL checkpoint (Load Checkpoint)"
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def plain_alias(t: Tensor) -> Tensor:
    """An ordinary tensor over ``t``'s memory (same storage, offset, size and stride; ``data_ptr()`` equal).

    Works for inference tensors, which autograd refuses to save for backward; call it outside inference mode
    (inside, the result would be an inference tensor again).
    """
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _error(detail: str, *, node: str | None, input: str, fix: str = _FIX_FAMILY) -> FinetuneError:
    return FinetuneError(detail, node=node, input=input, fix=fix)


def _check_unet(unet: Mapping[str, Tensor], family: Family, node: str | None) -> None:
    """The checks :func:`.ldm.detect_family` makes on a single file's UNet: text-to-image (4 input channels) and a
    class/ADM embedding (``label_emb``) exactly for SDXL."""
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None:
        raise _error("the MODEL is not an SD UNet (no input_blocks.0.0.weight)", node=node, input="model")
    if int(conv_in.shape[1]) != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(int(conv_in.shape[1]), "a variant")
        raise _error(f"the MODEL is {kind} of {family.label} (its UNet takes {int(conv_in.shape[1])} input "
                     "channels; text-to-image models take 4)", node=node, input="model")
    has_adm = "label_emb.0.0.weight" in unet
    if has_adm != (family is Family.SDXL):
        what = "has a class/ADM embedding (e.g. unCLIP)" if has_adm else "lacks SDXL's size/crop embedding"
        raise _error(f"the MODEL {what}: not a plain {family.label} text-to-image model", node=node, input="model")


def _text_parts(family: Family, text_encoders: Sequence[Mapping[str, Tensor]],
                text_layers: Sequence[int | None] | None, node: str | None) -> list[tuple[dict, dict, bool]]:
    """Per text encoder: (HF state dict without ``text_model.``, CLIPTextConfig kwargs, with projection)."""
    want = 2 if family is Family.SDXL else 1
    if len(text_encoders) != want:
        raise _error(f"the CLIP has {len(text_encoders)} text encoder(s); {family.label} has {want}", node=node,
                     input="clip", fix="connect the CLIP of the same checkpoint as the MODEL")
    layers = list(text_layers or [None] * want)
    out = []
    for i, sd in enumerate(text_encoders):
        hf = _strip_text_model(sd)
        if "embeddings.token_embedding.weight" not in hf or "encoder.layers.0.mlp.fc1.weight" not in hf:
            raise _error(f"text encoder {i + 1} of the CLIP is not a CLIP text transformer", node=node, input="clip",
                         fix="connect the CLIP of the same checkpoint as the MODEL")
        n = 1 + max(int(m.group(1)) for k in hf if (m := _LAYER.match(k)))
        keep = n if layers[i] is None else int(layers[i])
        if not 1 <= keep <= n:
            raise _error(f"text encoder {i + 1} has {n} layers but {keep} are asked for", node=node, input="clip",
                         fix="remove CLIP Set Last Layer, or set it within the encoder's depth")
        hf = {k: t for k, t in hf.items() if not ((m := _LAYER.match(k)) and int(m.group(1)) >= keep)}
        with_proj = family is Family.SDXL and i == 1
        if not with_proj:
            hf.pop("text_projection.weight", None)
        elif "text_projection.weight" not in hf:
            raise _error("SDXL's second text encoder (bigG) has no text projection", node=node, input="clip",
                         fix="connect the CLIP of the same checkpoint as the MODEL")
        # OpenAI CLIP-L (SD 1.x, SDXL's first) pads with the end token and uses quick_gelu; OpenCLIP ViT-H / bigG
        # pad with 0 and use exact gelu (the rules of a single file's conversion, core.ldm).
        layout = "hf" if (family is Family.SD1 or (family is Family.SDXL and i == 0)) else "openclip"
        out.append((hf, _infer_text_config(hf, layout, pad_is_eos=layout == "hf"), with_proj))
    return out


def _assign(cls, config, state: Mapping[str, Tensor], *, what: str, node: str | None, input: str):
    """``cls(config)`` built on the meta device with ``state``'s tensors assigned (the same tensors, no copy)."""
    with torch.device("meta"):
        model = cls(**config) if isinstance(config, dict) else cls(config)
    try:
        missing, unexpected = model.load_state_dict(dict(state), strict=False, assign=True)
    except RuntimeError as exc:  # a size mismatch
        raise _error(f"the {what} does not fit the architecture read from its shapes "
                     f"({str(exc).strip().splitlines()[-1][:200]})", node=node, input=input,
                     fix="connect the MODEL, CLIP and VAE of one standard SD 1.x, SD 2.x or SDXL checkpoint") from exc
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise _error(f"the {what} does not fit the architecture read from its shapes (missing {missing[:3]}"
                     f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})", node=node, input=input,
                     fix="connect the MODEL, CLIP and VAE of one standard SD 1.x, SD 2.x or SDXL checkpoint")
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # transformers' CLIP position ids (not stored in checkpoints): 0 .. n-1
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "position_ids":  # pragma: no cover - no other such buffer in SD components
                raise _error(f"cannot initialise buffer {name} of the {what}", node=node, input=input)
            owner.register_buffer(leaf, torch.arange(buf.shape[-1], device=next(model.parameters()).device)
                                  .expand(buf.shape), persistent=False)
    model.eval()
    model.requires_grad_(False)  # our Parameter objects only: the host's own keep their flags
    return model


def modules_from_native(family: Family | str, unet: Mapping[str, Tensor], vae: Mapping[str, Tensor],
                        text_encoders: Sequence[Mapping[str, Tensor]], *,
                        text_layers: Sequence[int | None] | None = None, latent_scale: float | None = None,
                        node: str | None = None) -> tuple[Any, Any, list]:
    """diffusers ``UNet2DConditionModel``, ``AutoencoderKL`` and transformers CLIP text models over the given tensors.

    Args:
        family: SD1, SD2 or SDXL (others raise).
        unet: UNet tensors under LDM names (``input_blocks.0.0.weight`` ...).
        vae: VAE tensors under LDM names (``encoder.conv_in.weight`` ...).
        text_encoders: per encoder (SDXL: CLIP-L, then bigG), tensors under HF CLIP names, with or without
            ``text_model.``.
        text_layers: per encoder, how many transformer layers to keep (``None``: all). The pack reads SD 1.x/2.x
            conditioning from the last kept layer through the final layer norm, so keeping ``k`` layers gives what
            a host reading layer ``k`` (normed) gives: SD 2.x's penultimate-layer convention, or a "CLIP skip".
        latent_scale: the VAE's latent scaling factor (default: the family's).
    Returns:
        ``(unet, vae, [text encoders])``, eval mode, ``requires_grad`` off. Every parameter reads the given
        tensors' memory (``data_ptr()`` equal); the VAE attention weights are ``[C, C]`` views of ``[C, C, 1, 1]``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415 - heavy at start-up
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    family = Family(family)
    if family not in NATIVE_FAMILIES:
        raise _error(f"{family.label} models cannot be bridged", node=node, input="model")
    with torch.inference_mode(False):
        unet_ldm = {k: plain_alias(t) for k, t in unet.items()}
        vae_ldm = {k: plain_alias(t) for k, t in vae.items()}
        texts = [({k: plain_alias(t) for k, t in hf.items()}, cfg, proj)
                 for hf, cfg, proj in _text_parts(family, text_encoders, text_layers, node)]

        _check_unet(unet_ldm, family, node)
        pooled = texts[1][1].get("projection_dim") if family is Family.SDXL else None
        try:
            unet_cfg = _infer_unet_config(unet_ldm, family, pooled)
        except FinetuneError as exc:  # the single-file rules word it for a checkpoint file
            raise _error(exc.detail.replace("this checkpoint is ", "the MODEL is "), node=node,
                         input="model") from exc
        try:
            vae_cfg = _infer_vae_config(vae_ldm, family)
        except (KeyError, IndexError) as exc:
            raise _error(f"the VAE is not an SD VAE (no {exc})", node=node, input="vae",
                         fix="connect an SD 1.x/2.x or SDXL VAE (4 latent channels)") from exc
        widths = sum(int(cfg["hidden_size"]) for _, cfg, _ in texts)
        if int(unet_cfg["cross_attention_dim"]) != widths:
            raise _error(f"the MODEL reads {unet_cfg['cross_attention_dim']}-wide text states but the CLIP gives "
                         f"{widths}", node=node, input="clip", fix="connect the CLIP of the same checkpoint")
        if int(vae_cfg["latent_channels"]) != 4 or int(unet_cfg["in_channels"]) != 4:
            raise _error(f"the VAE has {vae_cfg['latent_channels']} latent channels (SD VAEs have 4)", node=node,
                         input="vae", fix="connect an SD 1.x/2.x or SDXL VAE")
        vae_cfg["scaling_factor"] = float(latent_scale) if latent_scale is not None else info(family).latent_scale

        missing: list[str] = []
        unet_sd = rename_keys(unet_ldm, invert(unet_name_map(unet_cfg)), missing=missing)
        # VAE mid attention: LDM 1x1 conv [C, C, 1, 1] -> diffusers Linear [C, C] (a view: same memory)
        vae_src = {k: (t[:, :, 0, 0] if t.ndim == 4 and is_vae_conv_as_linear(k.rpartition(".")[0]) else t)
                   for k, t in vae_ldm.items()}
        vae_sd = rename_keys(vae_src, invert(vae_name_map(vae_cfg)), missing=missing)
        if missing:
            raise _error(f"{len(missing)} MODEL/VAE tensors have no place in the diffusers layout "
                         f"({', '.join(missing[:3])})", node=node, input="model")
        unet_m = _assign(UNet2DConditionModel, unet_cfg, unet_sd, what="MODEL", node=node, input="model")
        vae_m = _assign(AutoencoderKL, vae_cfg, vae_sd, what="VAE", node=node, input="vae")
        tes = []
        for hf, cfg, proj in texts:
            prefix = text_model_prefix(proj)
            sd = {(k if k == "text_projection.weight" else prefix + k): t for k, t in hf.items()}
            cls = CLIPTextModelWithProjection if proj else CLIPTextModel
            tes.append(_assign(cls, CLIPTextConfig(**cfg), sd, what="CLIP", node=node, input="clip"))
    return unet_m, vae_m, tes


def _fingerprint(parts: Sequence[Mapping[str, Tensor]]) -> str:
    """A cheap content fingerprint: each tensor's name, shape, dtype and the float64 sum of up to ~1024 of its
    values (evenly strided). Two different models differ in nearly every tensor, so this tells them apart."""
    h = hashlib.sha256()
    with torch.no_grad():
        for part in parts:
            for name in sorted(part):
                t = part[name]
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // 1024)
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{float(flat[::step].double().sum())!r}".encode())
    return h.hexdigest()[:16]


def _placed(module: torch.nn.Module, dtype: torch.dtype | None, device: torch.device) -> int:
    """Move/cast ``module``'s tensors that are not already on ``device`` (and in ``dtype`` when given; a UNet holding
    a few tensors in another dtype would not run): a copy for those only. Returns how many were copied."""
    copied = 0
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            if t.device != device or t.dtype != want:
                t.data = t.data.to(device=device, dtype=want)
                copied += 1
    return copied


def base_from_native(parts: Mapping[str, Any], device: str | torch.device = "auto", *, node: str | None = None,
                     tokenizers: Sequence[Any] | None = None) -> tuple[BaseModel, list[str]]:
    """A :class:`BaseModel` over the host's tensors, and notes for the node.

    ``parts`` is what ``host.native_model_parts`` returns: ``family``, ``prediction_type`` ("epsilon" /
    "v_prediction"), ``schedule`` (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``zero_snr``),
    ``latent_scale``, ``unet``/``vae`` (LDM names), ``text_encoders`` (HF names), ``text_layers``, ``notes``.

    Dtypes are the host's: the UNet's is the model's dtype (``BaseModel.dtype``); the VAE and the text encoders keep
    their own (ComfyUI keeps text encoders in fp16 even beside an fp32 UNet on a CPU; the pack casts text states to
    the UNet's dtype where they enter it, and decodes in the VAE's dtype).
    ``device``: "auto" is the host's compute device. Tensors already there are shared; others are copied there (on
    a GPU machine the weights in CPU memory stay ComfyUI's, one copy goes to the GPU, as ComfyUI itself does when it
    loads a model).
    """
    family = Family(parts["family"])
    dev = resolve_device(device) if isinstance(device, str) else device
    with torch.inference_mode(False):
        unet, vae, tes = modules_from_native(family, parts["unet"], parts["vae"], parts["text_encoders"],
                                             text_layers=parts.get("text_layers"),
                                             latent_scale=parts.get("latent_scale"), node=node)
        notes = list(parts.get("notes") or [])
        dtypes = [t.dtype for t in unet.parameters()]
        dtype = max(set(dtypes), key=dtypes.count)
        cast = _placed(unet, dtype, dev)
        moved = _placed(vae, None, dev) + sum(_placed(te, None, dev) for te in tes)
        if cast or moved:
            notes.append(f"copied {cast + moved} tensors to {dev.type} (ComfyUI holds them on another device or, "
                         f"for the UNet, in another dtype than {str(dtype).replace('torch.', '')})")
    if tokenizers is None:
        pads = info(family).te_pad_ids
        tokenizers = [find_clip_tokenizer(pads[min(i, len(pads) - 1)], vocab_size=int(te.config.vocab_size))
                      for i, te in enumerate(tes)]
    prediction = str(parts.get("prediction_type") or "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise _error(f"the MODEL predicts '{prediction}'; this pack trains epsilon and v-prediction models",
                     node=node, input="model", fix="remove the model-sampling node that changed it, or connect "
                                                   "an epsilon or v-prediction SD model")
    sched = default_scheduler_config(family, prediction)
    schedule = dict(parts.get("schedule") or {})
    for ours, theirs in (("num_train_timesteps", "num_train_timesteps"), ("beta_start", "beta_start"),
                         ("beta_end", "beta_end")):
        if schedule.get(theirs) is not None:
            sched[ours] = type(sched[ours])(schedule[theirs])
    if schedule.get("zero_snr"):
        sched["rescale_betas_zero_snr"] = True
    fingerprint = _fingerprint([parts["unet"], parts["vae"], *parts["text_encoders"]])
    label = str(parts.get("label") or f"ComfyUI {family.label} model")
    base = BaseModel(family=family, prediction_type=prediction, unet=unet, vae=vae, text_encoders=tes,
                     tokenizers=tokenizers, scheduler_config=sched, dtype=dtype, device=dev,
                     source=f"comfyui-native:{family.value}:{fingerprint}", label=label)
    return base, notes


def shared_fraction(modules: Sequence[torch.nn.Module], tensors: Sequence[Tensor]) -> tuple[int, int]:
    """``(bytes of ``modules``' parameters and buffers that lie in ``tensors``' storages, bytes that do not)``:
    how much of a bridged model is the host's memory and how much its own."""
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    shared = own = 0
    seen: set[int] = set()
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            n = t.untyped_storage().nbytes()
            if ptr in storages:
                shared += n
            else:
                own += n
    return shared, own
