"""Single-file (LDM/SGM: A1111, ComfyUI) checkpoints <-> diffusers/transformers state dicts, both ways.

:func:`ldm_to_diffusers` detects the family of a single-file state dict (by which keys it has), infers the diffusers
configs from tensor shapes (no hub, no yaml) and renames every tensor; :func:`diffusers_to_ldm` writes a dict
ComfyUI's CheckpointLoaderSimple and A1111 load (``model.diffusion_model.``, ``first_stage_model.``,
``cond_stage_model.`` / ``conditioner.embedders.N.`` prefixes and the LDM module names).
Module-name tables live in :mod:`.ldm_names`; this module adds family detection, config inference and the
text-encoder key rules. Nothing here loads or saves files.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import FinetuneError
from .families import Family, info
from .ldm_names import (
    OPENCLIP_TOP,
    hf_layer_key_to_openclip,
    invert,
    is_vae_conv_as_linear,
    openclip_layer_key_to_hf,
    rename_keys,
    unet_name_map,
    vae_name_map,
)

__all__ = [
    "LdmConversion", "ldm_to_diffusers", "diffusers_to_ldm", "detect_family", "unet_name_map", "vae_name_map",
    "text_model_prefix", "UNET_PREFIX", "VAE_PREFIX", "TEXT_PREFIXES",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: Per family, the single-file prefix of each text encoder and its layout ("hf" CLIP or "openclip").
TEXT_PREFIXES: dict[Family, tuple[tuple[str, str], ...]] = {
    Family.SD1: (("cond_stage_model.transformer.", "hf"),),
    Family.SD2: (("cond_stage_model.model.", "openclip"),),
    Family.SDXL: (("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")),
}
# LDM DDPM buffers stored beside the weights in old .ckpt files (ignored: the scheduler config carries them).
_LDM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}
_MARKERS = {"v_pred", "ztsnr"}
_SUPPORTED = "SD 1.x, SD 2.x and SDXL base text-to-image checkpoints"
_FIX = "pick a standard SD 1.x, SD 2.x or SDXL base checkpoint (.safetensors/.ckpt) in ckpt_name"


@dataclass
class LdmConversion:
    """Result of :func:`ldm_to_diffusers`.

    ``text_configs``/``text_encoders`` are ordered like the pipeline's encoders: SD1/SD2 ``[text_encoder]``
    (``CLIPTextModel``), SDXL ``[text_encoder (CLIPTextModel, CLIP-L), text_encoder_2
    (CLIPTextModelWithProjection, bigG)]``. Each text config is ``CLIPTextConfig`` kwargs; each state dict uses the
    key names the installed transformers' class accepts in ``load_state_dict`` (see :func:`text_model_prefix`).
    """

    family: Family
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_configs: list[dict[str, Any]]
    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoders: list[dict[str, Tensor]]
    prediction_hint: str | None = None
    unused_keys: list[str] = field(default_factory=list)


@functools.cache
def text_model_prefix(with_projection: bool) -> str:
    """``"text_model."`` if the installed transformers' CLIP text class keeps a ``text_model`` submodule, else ``""``.

    transformers 5.x ``CLIPTextModel`` has its layers at the top (``encoder.layers.0...``) while
    ``CLIPTextModelWithProjection`` keeps ``text_model.``. Probed once on the meta device.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         max_position_embeddings=4, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        keys = list(cls(cfg).state_dict())
    return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


# ------------------------------------------------------------------------------------------------- detection

def _refuse(found: str) -> FinetuneError:
    return FinetuneError(f"this checkpoint is {found}; supported are {_SUPPORTED}", input="ckpt_name", fix=_FIX)


def _describe(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"'{h}.*' ({n})" for h, n in top) or "no tensors"


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(state_dict: Mapping[str, Tensor]) -> Family:
    """The family of a single-file state dict, or FinetuneError(input="ckpt_name") naming what was found.

    Text-encoder prefixes decide (SD1 ``cond_stage_model.transformer.``, SD2 ``cond_stage_model.model.``, SDXL
    ``conditioner.embedders.0.transformer.`` + ``.1.model.``); the UNet must take 4 input channels and carry no
    class/ADM embedding except SDXL's. Refiner, inpainting, instruct-pix2pix and unCLIP files are refused.
    """
    keys = list(state_dict)
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(".lora_" in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
            raise FinetuneError("this file is a LoRA, not a checkpoint (it has lora_* keys and no UNet)",
                                input="ckpt_name",
                                fix="load it with the AddLoRA node and pick a base checkpoint here")
        raise _refuse(f"not an SD single-file checkpoint: no '{UNET_PREFIX}input_blocks.0.0.weight'; "
                      f"found {_describe(keys)}")
    if _has_prefix(keys, "embedder.model.") or _has_prefix(keys, "noise_augmentor."):
        raise _refuse("an SD 2.1 unCLIP model (it has an image embedder)")

    has = {name: _has_prefix(keys, prefix) for name, prefix in (
        ("sd1", "cond_stage_model.transformer."), ("sd2", "cond_stage_model.model."),
        ("xl_l", "conditioner.embedders.0.transformer."), ("xl_g", "conditioner.embedders.1.model."),
        ("refiner", "conditioner.embedders.0.model."))}
    label_emb = state_dict.get(UNET_PREFIX + "label_emb.0.0.weight")
    if has["refiner"] and not has["xl_l"]:
        raise _refuse("an SDXL refiner (only an OpenCLIP bigG text encoder at conditioner.embedders.0.model)")
    if has["xl_l"] and has["xl_g"]:
        family = Family.SDXL
    elif has["sd1"]:
        family = Family.SD1
    elif has["sd2"]:
        family = Family.SD2
    else:
        raise _refuse(f"a UNet without a known text encoder (found {_describe(keys)}); "
                      "expected cond_stage_model.transformer (SD1), cond_stage_model.model (SD2) or "
                      "conditioner.embedders.0.transformer + .1.model (SDXL)")
    in_ch = int(conv_in.shape[1])
    if in_ch != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_ch, "an unknown variant")
        raise _refuse(f"{kind} of {family.label} (UNet has {in_ch} input channels, text-to-image models have 4)")
    if family is not Family.SDXL and label_emb is not None:
        raise _refuse(f"an {family.label} variant with a class/ADM embedding (label_emb, e.g. unCLIP or upscaler)")
    if family is Family.SDXL and label_emb is None:
        raise _refuse("an SDXL-like file without the size/crop embedding (label_emb)")
    if not _has_prefix(keys, VAE_PREFIX) and not _has_prefix(keys, "vae."):
        raise _refuse(f"a {family.label} file without a VAE (no '{VAE_PREFIX}*' keys)")
    return family


# ------------------------------------------------------------------------------------------------- UNet / VAE config

def _indices(keys: list[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _attn_depth(u: Mapping[str, Tensor], keys: list[str], block: str) -> int:
    if f"{block}.1.proj_in.weight" not in u:
        return 0
    return len(_indices(keys, f"{block}.1.transformer_blocks."))


def _infer_unet_config(u: Mapping[str, Tensor], family: Family, pooled_dim: int | None) -> dict[str, Any]:
    keys = list(u)
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (resnet out channels, attention depth) per layer
    for idx in _indices(keys, "input_blocks.")[1:]:
        block = f"input_blocks.{idx}"
        if f"{block}.0.op.weight" in u:
            levels.append([])
        elif f"{block}.0.in_layers.2.weight" in u:
            levels[-1].append((int(u[f"{block}.0.in_layers.2.weight"].shape[0]), _attn_depth(u, keys, block)))
        else:
            raise _refuse(f"a UNet with an unknown input block layout at {block}")
    lpb = len(levels[0])
    if lpb == 0 or any(len(lv) != lpb for lv in levels):
        raise _refuse(f"a UNet with unequal resnet counts per level ({[len(lv) for lv in levels]})")
    channels = [lv[0][0] for lv in levels]
    depths = [lv[0][1] for lv in levels]
    if any(d != depths[i] or c != channels[i] for i, lv in enumerate(levels) for c, d in lv):
        raise _refuse("a UNet whose resnets/attentions differ inside one level")
    n = len(levels)
    out_idx = _indices(keys, "output_blocks.")
    if len(out_idx) != n * (lpb + 1):
        raise _refuse(f"a UNet with {len(out_idx)} output blocks (expected {n * (lpb + 1)})")
    up_depths = []
    for i in range(n):
        ds = {_attn_depth(u, keys, f"output_blocks.{i * (lpb + 1) + j}") for j in range(lpb + 1)}
        if len(ds) != 1:
            raise _refuse("a UNet whose up-level attentions differ inside one level")
        up_depths.append(ds.pop())
    mid_depth = _attn_depth(u, keys, "middle_block")
    if mid_depth == 0:
        raise _refuse("a UNet without a mid-block attention")

    # Levels without attention get depth 1 (unused), except a last one, whose value diffusers uses for the mid block.
    tlpb = [d if d else 1 for d in depths]
    if depths[-1] == 0:
        tlpb[-1] = mid_depth
    elif depths[-1] != mid_depth:
        raise _refuse("a UNet whose mid-block depth differs from its last level's")
    a_key = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = u[next(k for k in keys if k.endswith(".proj_in.weight"))]
    cfg: dict[str, Any] = dict(
        sample_size=info(family).default_size // 8,
        in_channels=int(u["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(u["out.2.weight"].shape[0]),
        layers_per_block=lpb,
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=int(u[a_key].shape[1]),
        use_linear_projection=proj_in.ndim == 2,
        attention_head_dim=8 if family is Family.SD1 else [max(1, c // 64) for c in channels],
        transformer_layers_per_block=tlpb if any(t != 1 for t in tlpb) else 1,
        norm_num_groups=32,
    )
    if family is Family.SD2:
        # SD 2.x (the 768-v models above all) overflows in fp16 attention: diffusers' SD 2.1 config and ComfyUI
        # (attn_precision fp32) both compute attention in fp32.
        cfg["upcast_attention"] = True
    expected_up = list(reversed(tlpb))
    if any(d and d != expected_up[i] for i, d in enumerate(up_depths)):
        cfg["reverse_transformer_layers_per_block"] = [d if d else 1 for d in up_depths]
    if family is Family.SDXL:
        adm = int(u["label_emb.0.0.weight"].shape[1])
        pooled = pooled_dim if pooled_dim is not None else 1280
        if (adm - pooled) <= 0 or (adm - pooled) % 6:
            raise _refuse(f"an SDXL-like UNet whose ADM input width {adm} is not pooled {pooled} + 6 x time embedding")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // 6,
                   projection_class_embeddings_input_dim=adm)
    return cfg


def _infer_vae_config(v: Mapping[str, Tensor], family: Family) -> dict[str, Any]:
    keys = list(v)
    n = len(_indices(keys, "encoder.down."))
    channels = [int(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    return dict(
        in_channels=int(v["encoder.conv_in.weight"].shape[1]),
        out_channels=int(v["decoder.conv_out.weight"].shape[0]),
        latent_channels=int(v["decoder.conv_in.weight"].shape[1]),
        block_out_channels=channels,
        layers_per_block=len(_indices(keys, "encoder.down.0.block.")),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        norm_num_groups=32,
        sample_size=info(family).default_size,
        scaling_factor=info(family).latent_scale,
        use_quant_conv="quant_conv.weight" in v,
        use_post_quant_conv="post_quant_conv.weight" in v,
    )


def _infer_text_config(hf: Mapping[str, Tensor], layout: str, pad_is_eos: bool) -> dict[str, Any]:
    """CLIPTextConfig kwargs from an HF text state dict without ``text_model.`` (sizes read from the tensors)."""
    vocab, hidden = (int(s) for s in hf["embeddings.token_embedding.weight"].shape)
    cfg: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(hf["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(_indices(list(hf), "encoder.layers.")),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=int(hf["embeddings.position_embedding.weight"].shape[0]),
        # OpenAI CLIP-L uses quick_gelu; OpenCLIP ViT-H/bigG use exact gelu (diffusers' SD2 / SDXL configs).
        hidden_act="quick_gelu" if layout == "hf" else "gelu",
        layer_norm_eps=1e-5,
        # CLIP BPE puts <|startoftext|>, <|endoftext|> last (49406, 49407 in the real vocabulary).
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1 if pad_is_eos else 0,
    )
    if "text_projection.weight" in hf:
        cfg["projection_dim"] = int(hf["text_projection.weight"].shape[0])
    return cfg


# ------------------------------------------------------------------------------------------------- text keys

def _strip_text_model(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("text_model."): t for k, t in sd.items() if not k.endswith("position_ids")}


def _openclip_to_hf(oc: Mapping[str, Tensor], drop_last: bool, used: set[str]) -> dict[str, Tensor]:
    """OpenCLIP keys (prefix removed) -> HF keys without ``text_model.``; ``used`` collects consumed keys."""
    layers = _indices(list(oc), "transformer.resblocks.")
    keep = set(layers[:-1] if drop_last else layers)
    hf: dict[str, Tensor] = {}
    for k, t in oc.items():
        if k in OPENCLIP_TOP:
            hf[OPENCLIP_TOP[k]] = t
        elif k == "text_projection":
            if not drop_last:
                hf["text_projection.weight"] = t.T.contiguous()  # [W, E] -> Linear weight [E, W]
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", k):
            n, rest = int(m.group(1)), m.group(2)
            if n not in keep:
                used.add(k)  # SD2: last resblock dropped on purpose (SD 2.x uses the penultimate layer)
                continue
            base = f"encoder.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    hf[f"{base}self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = chunk.clone()
            elif (hk := openclip_layer_key_to_hf(rest)) is not None:
                hf[base + hk] = t
            else:
                continue
        else:
            continue
        used.add(k)
    return hf


def _hf_to_openclip(hf: Mapping[str, Tensor], with_projection: bool) -> dict[str, Tensor]:
    top = invert(OPENCLIP_TOP)
    oc: dict[str, Tensor] = {}
    for k, t in hf.items():
        if k in top:
            oc[top[k]] = t
        elif k == "text_projection.weight":
            if with_projection:
                oc["text_projection"] = t.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", k):
            base, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
            if m2 := re.match(r"self_attn\.q_proj\.(weight|bias)$", rest):
                kind = m2.group(1)
                layer = f"encoder.layers.{m.group(1)}.self_attn"
                parts = [hf[f"{layer}.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
                oc[f"{base}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            elif re.match(r"self_attn\.[kv]_proj\.", rest):
                continue  # folded into in_proj with q
            elif (ok := hf_layer_key_to_openclip(rest)) is not None:
                oc[base + ok] = t
            else:
                raise ValueError(f"unknown text-encoder key {k!r}")
        else:
            raise ValueError(f"unknown text-encoder key {k!r}")
    return oc


# ------------------------------------------------------------------------------------------------- public API

def _ignored(key: str) -> bool:
    return (key.startswith("model_ema.") or key in _LDM_BUFFERS or key in _MARKERS or key.endswith("position_ids")
            or key.endswith(".logit_scale") or key.endswith(".attn_mask"))


def ldm_to_diffusers(state_dict: Mapping[str, Tensor]) -> LdmConversion:
    """Convert a single-file SD 1.x / 2.x / SDXL state dict to diffusers/transformers state dicts and configs.

    Args:
        state_dict: the checkpoint's tensors (already unwrapped from a ``{"state_dict": ...}`` container).
    Returns:
        :class:`LdmConversion`; tensors are shared with ``state_dict`` where no reshaping is needed.
    Raises:
        FinetuneError(input="ckpt_name") for refiner, inpainting, unCLIP or unknown layouts.
    """
    family = detect_family(state_dict)
    used: set[str] = set()

    def take(prefix: str) -> dict[str, Tensor]:
        part = {k[len(prefix):]: t for k, t in state_dict.items() if k.startswith(prefix)}
        used.update(prefix + k for k in part)
        return part

    # Text encoders first: SDXL's ADM width needs bigG's projection size.
    text_hf: list[dict[str, Tensor]] = []
    text_cfgs: list[dict[str, Any]] = []
    for n_enc, (prefix, layout) in enumerate(TEXT_PREFIXES[family]):
        raw = {k[len(prefix):]: t for k, t in state_dict.items() if k.startswith(prefix)}
        if layout == "hf":
            hf = _strip_text_model(raw)
            used.update(prefix + k for k in raw if k.removeprefix("text_model.") in hf)
        else:
            oc_used: set[str] = set()
            # SD2: diffusers keeps 23 of 24 resblocks and no projection. Files we (or diffusers' script) wrote have
            # already dropped them: they lack text_projection, so drop only when the full OpenCLIP tower is there.
            n_layers = len(_indices(list(raw), "transformer.resblocks."))
            drop = family is Family.SD2 and ("text_projection" in raw or n_layers == 24)
            hf = _openclip_to_hf(raw, drop_last=drop, used=oc_used)
            if drop and "text_projection" in raw:
                oc_used.add("text_projection")
            used.update(prefix + k for k in oc_used)
        with_proj = family is Family.SDXL and n_enc == 1
        if not with_proj:
            hf.pop("text_projection.weight", None)
            used.discard(prefix + "text_projection.weight")
            used.discard(prefix + "text_model.text_projection.weight")
        text_cfgs.append(_infer_text_config(hf, layout, pad_is_eos=layout == "hf"))
        out_prefix = text_model_prefix(with_proj)
        text_hf.append({(k if k == "text_projection.weight" else out_prefix + k): t for k, t in hf.items()})

    unet_ldm = take(UNET_PREFIX)
    vae_prefix = VAE_PREFIX if _has_prefix(list(state_dict), VAE_PREFIX) else "vae."
    vae_ldm = take(vae_prefix)
    pooled = text_cfgs[1].get("projection_dim") if family is Family.SDXL else None
    unet_cfg = _infer_unet_config(unet_ldm, family, pooled)
    widths = sum(c["hidden_size"] for c in text_cfgs)
    if unet_cfg["cross_attention_dim"] != widths:
        raise _refuse(f"a {family.label}-like file whose UNet context width {unet_cfg['cross_attention_dim']} "
                      f"does not match its text encoder width {widths}")
    vae_cfg = _infer_vae_config(vae_ldm, family)

    missing: list[str] = []
    unet = rename_keys(unet_ldm, invert(unet_name_map(unet_cfg)), missing=missing)
    # VAE mid attention: LDM 1x1 conv [C, C, 1, 1] -> diffusers Linear [C, C].
    vae_linear = {k for k in vae_ldm if vae_ldm[k].ndim == 4 and is_vae_conv_as_linear(k.rpartition(".")[0])}
    vae_src = {k: (t[:, :, 0, 0] if k in vae_linear else t) for k, t in vae_ldm.items()}
    vae = rename_keys(vae_src, invert(vae_name_map(vae_cfg)), missing=missing)
    used.difference_update(UNET_PREFIX + k for k in missing if k in unet_ldm)
    used.difference_update(vae_prefix + k for k in missing if k in vae_ldm)
    unused = [k for k in state_dict if k not in used and not _ignored(k)]
    hint = "v" if "v_pred" in state_dict else None
    return LdmConversion(family, unet_cfg, vae_cfg, text_cfgs, unet, vae, text_hf, hint, unused)


def diffusers_to_ldm(family: Family | str, unet: Mapping[str, Tensor], vae: Mapping[str, Tensor],
                     text_encoders: list[Mapping[str, Tensor]], *, unet_config: Mapping[str, Any],
                     vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Build a single-file state dict (LDM/SGM names) from diffusers/transformers state dicts.

    Args:
        family: SD1, SD2 or SDXL; decides the text-encoder prefixes and layouts.
        unet, vae: ``state_dict()`` of the diffusers UNet / AutoencoderKL.
        text_encoders: ``state_dict()`` of each text encoder (SDXL: [CLIP-L, bigG with projection]); keys with
            or without ``text_model.`` are accepted.
        unet_config, vae_config: the models' configs (``model.config``).
    Returns:
        ``{name: tensor}`` with ``model.diffusion_model.``, ``first_stage_model.`` and the family's text prefixes;
        HF text keys always carry ``text_model.``; OpenCLIP q/k/v are concatenated into ``in_proj``; bigG's
        ``text_projection`` is transposed back. SD2 gets no ``text_projection`` (diffusers' encoder has none).
    """
    family = Family(family)
    encoders = TEXT_PREFIXES[family]
    if len(text_encoders) != len(encoders):
        raise ValueError(f"{family.label} has {len(encoders)} text encoder(s), got {len(text_encoders)}")
    missing: list[str] = []
    out = {UNET_PREFIX + k: t for k, t in rename_keys(unet, unet_name_map(unet_config), missing=missing).items()}
    for k, t in rename_keys(vae, vae_name_map(vae_config), missing=missing).items():
        out[VAE_PREFIX + k] = t[:, :, None, None] if t.ndim == 2 and is_vae_conv_as_linear(k.rpartition(".")[0]) else t
    if missing:
        raise ValueError(f"keys not in the UNet/VAE name tables: {missing[:5]}")
    for n_enc, ((prefix, layout), sd) in enumerate(zip(encoders, text_encoders)):
        hf = _strip_text_model(sd)
        if layout == "hf":
            out.update({prefix + (k if k == "text_projection.weight" else "text_model." + k): t
                        for k, t in hf.items()})
        else:
            with_proj = family is Family.SDXL and n_enc == 1
            out.update({prefix + k: t for k, t in _hf_to_openclip(hf, with_proj).items()})
    return out
