"""Module-name tables between diffusers and the LDM/SGM single-file layout (A1111, ComfyUI).

Pure functions of a model config: they list every module that holds weights in a diffusers
``UNet2DConditionModel`` / ``AutoencoderKL`` of that config and give its LDM name.
Module paths are given without the single-file prefixes (``model.diffusion_model.``, ``first_stage_model.``).

Also here: the OpenCLIP <-> HF CLIP text-encoder key rules, which are per key, not per module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ------------------------------------------------------------------------------------------------- UNet

#: diffusers ResnetBlock2D child -> LDM ResBlock child.
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

#: Modules with weights inside one BasicTransformerBlock (same names on both sides).
_TRANSFORMER_BLOCK_PARTS = (
    "norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "norm3", "ff.net.0.proj", "ff.net.2",
)


def _per_level(value: Any, n: int) -> list[int]:
    """An int-or-sequence config value as one int per level."""
    if isinstance(value, int):
        return [value] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"expected {n} per-level values, got {values}")
    return values


def _add_resnet(table: dict[str, str], diff: str, ldm: str, shortcut: bool) -> None:
    for d_part, l_part in _UNET_RESNET_PARTS.items():
        if d_part == "conv_shortcut" and not shortcut:
            continue
        table[f"{diff}.{d_part}"] = f"{ldm}.{l_part}"


def _add_transformer(table: dict[str, str], diff: str, ldm: str, depth: int) -> None:
    # Transformer2DModel: norm, proj_in, blocks, proj_out - identical names in LDM's SpatialTransformer.
    for part in ("norm", "proj_in", "proj_out"):
        table[f"{diff}.{part}"] = f"{ldm}.{part}"
    for k in range(depth):
        for part in _TRANSFORMER_BLOCK_PARTS:
            table[f"{diff}.transformer_blocks.{k}.{part}"] = f"{ldm}.transformer_blocks.{k}.{part}"


def unet_name_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module path -> LDM module path for every weighted module of a UNet of this config.

    Works for any ``UNet2DConditionModel`` config built from ``CrossAttnDownBlock2D``/``DownBlock2D`` (and the
    matching up blocks) with a ``UNetMidBlock2DCrossAttn``: SD 1.x/2.x (4 levels), SDXL (3 levels), the tiny
    2-level test models. LDM blocks are numbered sequentially: ``input_blocks.0`` is ``conv_in``, then per
    down level ``layers_per_block`` blocks ``[ResBlock, SpatialTransformer?]`` and one ``Downsample`` block
    (not after the last level); ``output_blocks`` hold ``layers_per_block + 1`` blocks per up level, the last
    one of a level also carrying the ``Upsample`` (index 1 without attention, 2 with).
    SDXL's ``add_embedding`` maps to ``label_emb.0.0`` / ``label_emb.0.2``.
    """
    channels = [int(c) for c in unet_config["block_out_channels"]]
    n = len(channels)
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = _per_level(unet_config.get("layers_per_block", 2), n)
    depth = _per_level(unet_config.get("transformer_layers_per_block", 1) or 1, n)
    rev_depth_cfg = unet_config.get("reverse_transformer_layers_per_block")
    up_depth = _per_level(rev_depth_cfg, n) if rev_depth_cfg is not None else list(reversed(depth))
    up_layers = list(reversed(layers))

    table: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
    }
    if unet_config.get("addition_embed_type") == "text_time":
        table["add_embedding.linear_1"] = "label_emb.0.0"
        table["add_embedding.linear_2"] = "label_emb.0.2"

    idx = 1
    prev = channels[0]
    for i, (ch, btype) in enumerate(zip(channels, down_types)):
        attn = "CrossAttn" in btype
        for j in range(layers[i]):
            _add_resnet(table, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0",
                        shortcut=(prev if j == 0 else ch) != ch)
            if attn:
                _add_transformer(table, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", depth[i])
            idx += 1
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
        prev = ch

    mid_type = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported mid_block_type {mid_type!r}")
    _add_resnet(table, "mid_block.resnets.0", "middle_block.0", shortcut=False)
    _add_transformer(table, "mid_block.attentions.0", "middle_block.1", depth[-1])
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2", shortcut=False)

    idx = 0
    for i, btype in enumerate(up_types):
        attn = "CrossAttn" in btype
        # Every up resnet sees a concatenated skip connection, so in != out and a conv_shortcut always exists.
        for j in range(up_layers[i] + 1):
            _add_resnet(table, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", shortcut=True)
            if attn:
                _add_transformer(table, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", up_depth[i])
            if j == up_layers[i] and i < n - 1:
                table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if attn else 1}.conv"
            idx += 1

    table["conv_norm_out"] = "out.0"
    table["conv_out"] = "out.2"
    return table


# ------------------------------------------------------------------------------------------------- VAE

_VAE_RESNET_PARTS = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut",
}
_VAE_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

#: LDM VAE attention modules whose 1x1-conv weight [C, C, 1, 1] is a diffusers Linear weight [C, C].
VAE_CONV_AS_LINEAR = ("q", "k", "v", "proj_out")


def _add_vae_resnet(table: dict[str, str], diff: str, ldm: str, shortcut: bool) -> None:
    for d_part, l_part in _VAE_RESNET_PARTS.items():
        if d_part == "conv_shortcut" and not shortcut:
            continue
        table[f"{diff}.{d_part}"] = f"{ldm}.{l_part}"


def _add_vae_mid(table: dict[str, str], side: str) -> None:
    _add_vae_resnet(table, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", shortcut=False)
    for d_part, l_part in _VAE_ATTN_PARTS.items():
        table[f"{side}.mid_block.attentions.0.{d_part}"] = f"{side}.mid.attn_1.{l_part}"
    _add_vae_resnet(table, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", shortcut=False)


def vae_name_map(vae_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module path -> LDM module path for every weighted module of an ``AutoencoderKL`` of this config.

    The decoder's levels are numbered in reverse in LDM (``decoder.up.(n-1-i)`` = ``decoder.up_blocks.i``).
    The mid-block attention ``to_q/to_k/to_v/to_out.0`` are ``nn.Linear`` in diffusers and 1x1 ``Conv2d``
    (``q/k/v/proj_out``) in LDM: convert their weights with :func:`vae_weight_to_ldm` /
    :func:`vae_weight_to_diffusers`.
    """
    channels = [int(c) for c in vae_config["block_out_channels"]]
    n = len(channels)
    lpb = int(vae_config.get("layers_per_block", 2))
    table: dict[str, str] = {"encoder.conv_in": "encoder.conv_in", "decoder.conv_in": "decoder.conv_in"}

    prev = channels[0]
    for i, ch in enumerate(channels):
        for j in range(lpb):
            _add_vae_resnet(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                            shortcut=(prev if j == 0 else ch) != ch)
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        prev = ch
    _add_vae_mid(table, "encoder")
    table["encoder.conv_norm_out"] = "encoder.norm_out"
    table["encoder.conv_out"] = "encoder.conv_out"
    if vae_config.get("use_quant_conv", True):
        table["quant_conv"] = "quant_conv"
    if vae_config.get("use_post_quant_conv", True):
        table["post_quant_conv"] = "post_quant_conv"

    _add_vae_mid(table, "decoder")
    rev = list(reversed(channels))
    prev = rev[0]
    for i, ch in enumerate(rev):
        ldm_level = n - 1 - i
        for j in range(lpb + 1):
            _add_vae_resnet(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}",
                            shortcut=(prev if j == 0 else ch) != ch)
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
        prev = ch
    table["decoder.conv_norm_out"] = "decoder.norm_out"
    table["decoder.conv_out"] = "decoder.conv_out"
    return table


def is_vae_conv_as_linear(ldm_module: str) -> bool:
    """True for the LDM VAE mid-attention q/k/v/proj_out modules (1x1 conv in LDM, Linear in diffusers)."""
    parts = ldm_module.split(".")
    return len(parts) >= 2 and parts[-2] == "attn_1" and parts[-1] in VAE_CONV_AS_LINEAR


# ------------------------------------------------------------------------------------------------- text

#: OpenCLIP (after the checkpoint prefix) -> HF CLIP key (without ``text_model.``), for keys outside the resblocks.
OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}

#: OpenCLIP resblock child -> HF encoder layer child (q/k/v are handled apart: ``attn.in_proj_*``).
OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_layer_key_to_hf(rest: str) -> str | None:
    """Map ``<child>.<param>`` of one OpenCLIP resblock to the HF layer key; None for ``attn.in_proj_*``/unknown."""
    for oc, hf in OPENCLIP_LAYER.items():
        if rest.startswith(oc + "."):
            return hf + rest[len(oc):]
    return None


def hf_layer_key_to_openclip(rest: str) -> str | None:
    """Inverse of :func:`openclip_layer_key_to_hf`; None for q/k/v projections and unknown keys."""
    for oc, hf in OPENCLIP_LAYER.items():
        if rest.startswith(hf + "."):
            return oc + rest[len(hf):]
    return None


def invert(table: Mapping[str, str]) -> dict[str, str]:
    """Invert a one-to-one name table (raises on duplicates, which would be a bug in the table)."""
    out: dict[str, str] = {}
    for k, v in table.items():
        if v in out:
            raise ValueError(f"name table is not one-to-one: {v!r} <- {out[v]!r}, {k!r}")
        out[v] = k
    return out


def rename_keys(state: Mapping[str, Any], table: Mapping[str, str], *,
                missing: list[str] | None = None) -> dict[str, Any]:
    """Rename ``<module>.<param>`` keys through a module table; keys whose module is absent go to ``missing``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        target = table.get(module)
        if target is None:
            if missing is not None:
                missing.append(key)
            continue
        out[f"{target}.{param}"] = value
    return out

