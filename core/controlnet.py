"""ControlNets in the diffusers layout (InstantID's IdentityNet), loaded to run beside a UNet.

Facts relied on:

* A diffusers ``ControlNetModel`` is saved as ``config.json`` + ``diffusion_pytorch_model.safetensors``; its keys
  are the UNet's encoder half (``conv_in``, ``time_embedding``, ``add_embedding`` for SDXL, ``down_blocks``,
  ``mid_block``) plus ``controlnet_cond_embedding.*`` (``conv_in``, ``blocks.<i>``, ``conv_out``: the hint
  encoder), ``controlnet_down_blocks.<i>`` and ``controlnet_mid_block`` (the 1x1 "zero" convolutions). Its
  architecture is ``ControlNetModel.from_unet(unet)``'s but for the hint encoder, whose widths
  (``conditioning_embedding_out_channels``, default 16, 32, 96, 256) and input channels follow from
  ``controlnet_cond_embedding.conv_in`` (``[c0, channels, 3, 3]``) and ``blocks.<2i+1>`` (``[c_{i+1}, c_i, 3, 3]``,
  the stride-2 convolutions).
* ComfyUI also loads ControlNets saved from the original (ldm) code: keys ``control_model.input_blocks...``,
  ``zero_convs``, ``input_hint_block``, ``middle_block_out`` (or the same without ``control_model.``). Those are
  not read here.
* Its residuals (12 down + 1 mid for SD 1.x / SDXL's block layout) are added to the UNet's skip connections, so its
  down blocks must match the UNet's (channels, layers per block, block types, transformer depth, context width).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from .errors import FinetuneError
from .safeio import SAFETENSORS_SUFFIXES, load_safetensors, read_safetensors_header

__all__ = ["load_controlnet", "controlnet_config", "LDM_PREFIXES", "DIFFUSERS_WEIGHTS"]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LDM_PREFIXES = ("control_model.", "input_blocks.", "zero_convs.", "input_hint_block.", "middle_block_out.",
                "middle_block.")
_REQUIRED = ("controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight")
_FIX_LAYOUT = ("use the ControlNet in the diffusers layout: the diffusion_pytorch_model.safetensors of its "
               "model folder (for InstantID: InstantX/InstantID ControlNetModel/diffusion_pytorch_model.safetensors), "
               "put in models/controlnet (renamed, or in a sub-folder with its config.json)")
# UNet config fields a ControlNet must share for its residuals to fit the UNet's skip connections.
_FIT_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
               "transformer_layers_per_block", "cross_attention_dim", "addition_embed_type",
               "projection_class_embeddings_input_dim")


def _norm(field: str, value: Any, blocks: int) -> Any:
    if isinstance(value, (list, tuple)):
        value = [_norm(field, v, blocks) for v in value]
        if field == "cross_attention_dim":  # one width per block in some configs
            return value[0] if len(set(map(str, value))) == 1 else value
        return value
    if field == "transformer_layers_per_block" and value is not None:
        return [int(value)] * blocks
    return value


def _fit_problems(config: dict, unet) -> list[str]:
    blocks = len(unet.config.block_out_channels)
    out = []
    for field in _FIT_FIELDS:
        want = _norm(field, unet.config.get(field, None), blocks)
        have = _norm(field, config.get(field, None), blocks)
        if field == "transformer_layers_per_block":  # a ControlNet has no up blocks; an int means every block
            want = want or [1] * blocks
            have = have or [1] * blocks
        if have != want:
            out.append(f"{field} {have} (the UNet's: {want})")
    return out


def _weights_and_config(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        config = path / "config.json"
        return path / DIFFUSERS_WEIGHTS, config if config.is_file() else None
    for config in (path.with_suffix(".json"), path.parent / "config.json"):
        if config.is_file():
            try:
                raw = json.loads(config.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(raw, dict) and raw.get("_class_name") == "ControlNetModel":
                return path, config
    return path, None


def controlnet_config(unet, header_shapes: dict[str, tuple[int, ...]]) -> dict:
    """A ``ControlNetModel`` config for ``unet`` (what ``ControlNetModel.from_unet`` builds), with the hint
    encoder's widths read from the weights' shapes."""
    from diffusers import ControlNetModel  # noqa: PLC0415

    cfg = dict(unet.config)
    channels = [int(header_shapes["controlnet_cond_embedding.conv_in.weight"][0])]
    i = 1
    while f"controlnet_cond_embedding.blocks.{i}.weight" in header_shapes:
        channels.append(int(header_shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0]))
        i += 2
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in cfg.items() if k in accepted and not k.startswith("_")}
    config.update(conditioning_embedding_out_channels=tuple(channels),
                  conditioning_channels=int(header_shapes["controlnet_cond_embedding.conv_in.weight"][1]),
                  controlnet_conditioning_channel_order="rgb")
    return config


def load_controlnet(path: str | Path, unet, *, node: str | None = None, input: str = "controlnet_name"):
    """A diffusers-layout ControlNet for ``unet`` from a ``.safetensors`` file (or a folder with ``config.json`` and
    ``diffusion_pytorch_model.safetensors``): eval mode, no gradients, on the UNet's device and dtype. A
    ``<file>.json`` or a ControlNetModel ``config.json`` beside the file gives the architecture; otherwise it follows
    from the UNet and the weights' shapes."""
    import torch  # noqa: PLC0415
    from diffusers import ControlNetModel  # noqa: PLC0415

    path = Path(path)
    weights, config_file = _weights_and_config(path)
    name = path.name
    if weights.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise FinetuneError(f"'{name}' is not a .safetensors file; ControlNets are read from safetensors only",
                            node=node, input=input, fix=_FIX_LAYOUT)
    if not weights.is_file():
        raise FinetuneError(f"'{name}' has no {DIFFUSERS_WEIGHTS}", node=node, input=input, fix=_FIX_LAYOUT)
    header = read_safetensors_header(weights, node=node, input=input)
    shapes = {k: tuple(t.shape) for k, t in header.tensors.items()}
    if any(k.startswith(LDM_PREFIXES) for k in shapes):
        example = next(k for k in shapes if k.startswith(LDM_PREFIXES))
        raise FinetuneError(f"'{name}' is a ControlNet in the original (ldm / ComfyUI) layout (keys like "
                            f"{example}); only the diffusers layout is read here", node=node, input=input,
                            fix=_FIX_LAYOUT)
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        raise FinetuneError(f"'{name}' is not a diffusers ControlNet (no {missing[0]})", node=node, input=input,
                            fix=_FIX_LAYOUT)
    if config_file is not None:
        raw = json.loads(config_file.read_text())
        config = {k: v for k, v in raw.items() if not k.startswith("_")}
    else:
        config = controlnet_config(unet, shapes)
    problems = _fit_problems(config, unet)
    if problems:
        raise FinetuneError(f"'{name}' is made for another UNet: {'; '.join(problems[:3])}", node=node, input=input,
                            fix="use the ControlNet made for this model family (InstantID's IdentityNet is for "
                            "SDXL)")
    try:
        with torch.device("meta"):
            model = ControlNetModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a config diffusers refuses
        raise FinetuneError(f"'{name}': its config does not build a ControlNet ({type(exc).__name__}: {exc})"
                            .split("\n")[0], node=node, input=input, fix=_FIX_LAYOUT) from exc
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    absent = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    wrong = [f"{k} {shapes[k]} (expected {want[k]})" for k in want if k in shapes and shapes[k] != want[k]]
    if absent or extra or wrong:
        detail = "; ".join(part for part in (
            f"{len(absent)} missing (e.g. {absent[0]})" if absent else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else "") if part)
        raise FinetuneError(f"'{name}' does not fit a ControlNet for this UNet: {detail}", node=node, input=input,
                            fix="use the ControlNet made for this model (InstantID's IdentityNet for SDXL), in the "
                            "diffusers layout, with its config.json beside it if it is not built like the UNet")
    state, _ = load_safetensors(weights, node=node, input=input)
    dtype, device = unet.dtype, unet.device
    state = {k: v.to(dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for buf_name, buf in model.named_buffers():
        if buf.is_meta:  # pragma: no cover - ControlNetModel has no buffers outside its state dict today
            raise FinetuneError(f"'{name}': the ControlNet's buffer {buf_name} has no value", node=node, input=input,
                                fix=_FIX_LAYOUT)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
