"""Image prompts: IP-Adapter-style decoupled image cross-attention as a patch on the model handle.

A reference image goes through an image encoder (CLIP vision, or a face-recognition embedding for InstantID); a
projection turns its embedding into a few extra cross-attention tokens; every cross-attention layer of the UNet
gets its own key/value projections for those tokens, and adds their attention to the text attention, scaled by a
strength. The base weights are never touched: while a sampling call runs, the UNet's cross-attention processors
are wrapped, and the image tokens ride at the end of the text context (the layout of the reference
implementation, which splits the last ``num_tokens`` tokens off ``encoder_hidden_states``).

Facts this module relies on (the published IP-Adapter and InstantID weights):

* A file holds ``image_proj.*`` (the projection) and ``ip_adapter.<i>.to_k_ip.weight`` /
  ``ip_adapter.<i>.to_v_ip.weight`` (``[inner, cross_dim]``, no bias). ``i`` = 1, 3, 5, ...: the odd positions in
  the list of the UNet's attention processors in diffusers' order (each transformer block's ``attn1`` then
  ``attn2``; down blocks, then up blocks, then the mid block), so one pair per cross-attention (``attn2``) layer:
  16 for SD 1.x/2.x, 70 for SDXL. ``.bin`` files hold the same as ``{"image_proj": {...}, "ip_adapter": {...}}``.
* Projections: *linear tokens* (``proj`` Linear(embed -> tokens * cross_dim) then ``norm`` LayerNorm(cross_dim);
  its input is the encoder's projected ``image_embeds``: ip-adapter_sd15, ip-adapter_sdxl); a *resampler*
  (Perceiver: ``latents [1, queries, dim]``, ``proj_in``, ``layers.<n>.0`` attention with ``norm1``, ``norm2``,
  ``to_q``, ``to_kv``, ``to_out`` (no biases, 64-wide heads, q and k each scaled by dim_head^-1/4, keys and values
  over the inputs and the latents together) and ``layers.<n>.1`` feed-forward (LayerNorm, Linear, GELU, Linear, no
  biases), ``proj_out``, ``norm_out``, optional ``pos_emb``; input the encoder's penultimate hidden states
  (the "plus" adapters) or InstantID's 512-wide face embedding); an *MLP* (``proj.0`` Linear, GELU, ``proj.2``
  Linear, ``proj.3`` LayerNorm; penultimate hidden states: ip-adapter-full-face).
* Attention: ``to_out(attention(q, k_text, v_text) + scale * attention(q, to_k_ip(t), to_v_ip(t)))``, no mask on
  the image part. Here the text part is the UNet's own processor, unchanged, and the image part is added after
  ``to_out``'s linear map (linear, so the same sum up to rounding), which keeps the text path bit for bit.
* Classifier-free guidance: the unconditional rows get the projection of zeros (a zero ``image_embeds`` or face
  embedding), or of the encoder's hidden states for an all-zero (normalised) image.
* InstantID's ControlNet (IdentityNet) takes the image tokens alone as its ``encoder_hidden_states``; its
  residuals, times its strength, are added to the UNet's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FinetuneError
from .safeio import load_weights

if TYPE_CHECKING:  # pragma: no cover
    from .handle import ModelHandle

__all__ = ["ImageAdapter", "ImagePromptPatch", "ControlHint", "adapter_from_state_dict", "load_adapter",
           "cross_attention_layers", "image_prompts", "attached", "check_adapter_fits", "build_projection",
           "project", "ip_state_dict", "ImagePromptAttention"]

#: Width of every published resampler's attention heads (h94 and InstantID: dim_head=64).
RESAMPLER_HEAD_DIM = 64
#: InstantID's face embedding (insightface antelopev2 recognition model) is 512 wide.
FACE_EMBED_DIM = 512


@dataclass(frozen=True, eq=False)
class ImageAdapter:
    """One adapter file: its projection and per-layer key/value weights (CPU, as stored).

    ``input`` is what the projection reads: ``"image_embeds"`` (the encoder's projected embedding), ``"hidden"``
    (the encoder's penultimate hidden states) or ``"face"`` (a face-recognition embedding, InstantID)."""

    name: str
    kind: str
    input: str
    embed_dim: int
    cross_dim: int
    num_tokens: int  # tokens per image (for the MLP projection: as many as the encoder's hidden states)
    image_proj: Mapping[str, Any]
    ip_layers: tuple[tuple[Any, Any], ...]  # (to_k_ip, to_v_ip) per cross-attention layer, in processor order
    extra: Mapping[str, Any] = field(default_factory=dict)  # other tensors of the file (a LoRA shipped with it)
    metadata: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, int] = field(default_factory=dict)  # resampler dims

    @cached_property
    def fingerprint(self) -> str:
        """A cheap content mark of the per-layer weights (two files with one name and projection still differ)."""
        return repr(sum(float(k.double().sum()) + 2.0 * float(v.double().sum()) for k, v in self.ip_layers))

    @property
    def label(self) -> str:
        if self.input == "face":
            return "InstantID"
        return {"linear": "IP-Adapter", "resampler": "IP-Adapter plus", "mlp": "IP-Adapter full-face"}[self.kind]


@dataclass(frozen=True, eq=False)
class ControlHint:
    """A ControlNet run beside the UNet on an image (InstantID's face keypoints), fed the image tokens."""

    controlnet: Any
    image: Any  # [1, 3, H, W] 0..1 float32 CPU
    strength: float


@dataclass(frozen=True, eq=False)
class ImagePromptPatch:
    """What Apply Image Prompt adds to a handle: an adapter, the tokens of its reference image(s) and a strength."""

    adapter: ImageAdapter
    cond: Any    # [1, N, cross_dim] image tokens of the reference (float32, CPU)
    uncond: Any  # [1, N, cross_dim] tokens of "no image", for the unconditional rows
    strength: float = 1.0
    control: ControlHint | None = None

    def signature(self) -> list:
        return ["image_prompt", self.adapter.name, self.adapter.fingerprint, self.strength,
                repr(float(self.cond.double().sum())),
                None if self.control is None else [self.control.strength, repr(float(self.control.image.sum()))]]

    def describe(self) -> str:
        return f"+ {self.adapter.label} {self.adapter.name} ({self.strength:g})"


# ------------------------------------------------------------------------------------------------ parsing
def _split_layers(ip: Mapping[str, Any], *, node, input) -> tuple[tuple[Any, Any], ...]:
    index: dict[int, dict[str, Any]] = {}
    for key, value in ip.items():
        m = re.fullmatch(r"(\d+)\.(to_k_ip|to_v_ip)\.weight", key)
        if m is None:
            continue
        index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not index:
        raise FinetuneError("the file has no ip_adapter.<n>.to_k_ip / to_v_ip weights", node=node, input=input,
                            fix="use an IP-Adapter or InstantID adapter file (h94 / InstantX layout)")
    ids = sorted(index)
    if ids != list(range(1, 2 * len(ids), 2)) or any(len(index[i]) != 2 for i in ids):
        raise FinetuneError(f"the adapter's layers are numbered {ids[:6]}..., not 1, 3, 5, ... with a key and a value "
                            "each", node=node, input=input, fix="the file is damaged or not an IP-Adapter; download "
                            "it again")
    return tuple((index[i]["to_k_ip"], index[i]["to_v_ip"]) for i in ids)


def adapter_from_state_dict(name: str, state: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
                            node: str | None = None, input: str = "adapter_name") -> ImageAdapter:
    """Parse an adapter's tensors (flat ``image_proj.*`` / ``ip_adapter.*`` keys, or the nested ``.bin`` dict)."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping) and key in ("image_proj", "ip_adapter"):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    proj = {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")}
    ip = {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")}
    if not proj:
        raise FinetuneError(f"'{name}' has no image_proj.* weights", node=node, input=input,
                            fix="use an IP-Adapter or InstantID adapter file (h94 / InstantX layout)")
    layers = _split_layers(ip, node=node, input=input)
    cross = int(layers[0][0].shape[1])
    config: dict[str, int] = {}
    if "latents" in proj:
        kind = "resampler"
        if any(k.startswith("to_latents_from_mean_pooled_seq") for k in proj):
            raise FinetuneError(f"'{name}' uses a mean-pooled resampler, which is not supported", node=node,
                                input=input, fix="use an IP-Adapter plus / plus-face or InstantID file")
        _, queries, dim = proj["latents"].shape
        embed = int(proj["proj_in.weight"].shape[1])
        depth = 1 + max(int(m.group(1)) for k in proj if (m := re.match(r"layers\.(\d+)\.", k)))
        inner = int(proj["layers.0.0.to_q.weight"].shape[0])
        config = {"dim": int(dim), "depth": depth, "heads": inner // RESAMPLER_HEAD_DIM,
                  "dim_head": RESAMPLER_HEAD_DIM, "queries": int(queries), "embed": embed,
                  "output": int(proj["proj_out.weight"].shape[0]),
                  "ff_inner": int(proj["layers.0.1.1.weight"].shape[0]),
                  "pos": int(proj["pos_emb.weight"].shape[0]) if "pos_emb.weight" in proj else 0}
        tokens = int(queries)
        source = "face" if embed == FACE_EMBED_DIM and "pos_emb.weight" not in proj else "hidden"
    elif "proj.3.weight" in proj:  # full-face's MLP; FaceID's proj.0/proj.2 + norm is another model
        kind, source = "mlp", "hidden"
        embed = int(proj["proj.0.weight"].shape[1])
        tokens = 0
    elif "proj.weight" in proj:
        kind, source = "linear", "image_embeds"
        embed = int(proj["proj.weight"].shape[1])
        tokens = int(proj["proj.weight"].shape[0]) // cross
    else:
        known = ", ".join(sorted(proj)[:4])
        raise FinetuneError(f"'{name}' has an image projection this pack does not know ({known})",
                            node=node, input=input, fix="use an IP-Adapter (base, plus, plus-face, full-face) or "
                            "InstantID file; FaceID adapters are not supported")
    meta = dict(metadata or {})
    if meta.get("ft_image_input") in ("image_embeds", "hidden", "face"):  # written by the pack's own adapters
        source = meta["ft_image_input"]
    rest = {k: v for k, v in flat.items() if not k.startswith(("image_proj.", "ip_adapter."))}
    adapter = ImageAdapter(name, kind, source, embed, cross, tokens, proj, layers, rest, meta, config)
    _check_projection(adapter, node=node, input=input)
    return adapter


def _check_projection(adapter: ImageAdapter, *, node, input) -> None:
    """Refuse a projection whose tensors do not fit the module its keys name (checked on the meta device: no
    memory, no copy), so that a damaged or unknown variant is named here rather than failing to load later."""
    import torch  # noqa: PLC0415

    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in build_projection(adapter, load=False).state_dict().items()}
    except (RuntimeError, ValueError, ZeroDivisionError):  # e.g. a resampler narrower than one 64-wide head
        want = {}
    have = {k: tuple(getattr(v, "shape", ())) for k, v in adapter.image_proj.items()}
    wrong = [f"{k} missing" for k in sorted(want.keys() - have.keys())]
    wrong += [f"{k} unexpected" for k in sorted(have.keys() - want.keys())]
    wrong += [f"{k} is {list(have[k])}, not {list(want[k])}" for k in sorted(want.keys() & have.keys())
              if have[k] != want[k]]
    if wrong:
        raise FinetuneError(f"'{adapter.name}' has image_proj tensors that do not fit an {adapter.label} projection "
                            f"({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})", node=node, input=input,
                            fix="the file is damaged or a variant this pack does not support; download it again, or "
                            "use an h94 IP-Adapter (base, plus, plus-face, full-face) or InstantID file")


def load_adapter(path: str | Path, *, node: str | None = None, input: str = "adapter_name") -> ImageAdapter:
    """An adapter file: ``.safetensors``, or a ``.bin`` read with weights-only loading (never a full unpickle)."""
    path = Path(path)
    state, metadata = load_weights(path, node=node, input=input)
    return adapter_from_state_dict(path.name, state, metadata, node=node, input=input)


def ip_state_dict(adapter: ImageAdapter) -> dict[str, Any]:
    """The flat safetensors layout of ``adapter`` (what h94's ``.safetensors`` files hold)."""
    out = {f"image_proj.{k}": v for k, v in adapter.image_proj.items()}
    for i, (k, v) in enumerate(adapter.ip_layers):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = k
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = v
    return out


# ------------------------------------------------------------------------------------------------ modules
@cache
def _modules():
    """The projection modules (built on first use: torch stays off the import path)."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    class LinearTokens(nn.Module):
        def __init__(self, embed: int, cross: int, tokens: int) -> None:
            super().__init__()
            self.tokens, self.cross = tokens, cross
            self.proj = nn.Linear(embed, tokens * cross)
            self.norm = nn.LayerNorm(cross)

        def forward(self, x):
            return self.norm(self.proj(x).reshape(-1, self.tokens, self.cross))

    class MLP(nn.Module):
        def __init__(self, embed: int, cross: int) -> None:
            super().__init__()
            self.proj = nn.Sequential(nn.Linear(embed, embed), nn.GELU(), nn.Linear(embed, cross), nn.LayerNorm(cross))

        def forward(self, x):
            return self.proj(x)

    class PerceiverAttention(nn.Module):
        def __init__(self, dim: int, dim_head: int, heads: int) -> None:
            super().__init__()
            self.dim_head, self.heads = dim_head, heads
            inner = dim_head * heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.to_q = nn.Linear(dim, inner, bias=False)
            self.to_kv = nn.Linear(dim, inner * 2, bias=False)
            self.to_out = nn.Linear(inner, dim, bias=False)

        def forward(self, x, latents):
            x, latents = self.norm1(x), self.norm2(latents)
            b, n, _ = latents.shape
            q = self.to_q(latents)
            k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
            q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
            scale = 1 / math.sqrt(math.sqrt(self.dim_head))
            weight = (q * scale) @ (k * scale).transpose(-2, -1)
            weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
            out = (weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
            return self.to_out(out)

    class Resampler(nn.Module):
        def __init__(self, dim, depth, dim_head, heads, queries, embed, output, ff_inner, pos) -> None:
            super().__init__()
            self.latents = nn.Parameter(torch.zeros(1, queries, dim))
            self.pos_emb = nn.Embedding(pos, embed) if pos else None
            self.proj_in = nn.Linear(embed, dim)
            self.proj_out = nn.Linear(dim, output)
            self.norm_out = nn.LayerNorm(output)
            self.layers = nn.ModuleList(nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_inner, bias=False), nn.GELU(),
                              nn.Linear(ff_inner, dim, bias=False))]) for _ in range(depth))

        def forward(self, x):
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
            latents = self.latents.repeat(x.shape[0], 1, 1)
            x = self.proj_in(x)
            for attn, ff in self.layers:
                latents = attn(x, latents) + latents
                latents = ff(latents) + latents
            return self.norm_out(self.proj_out(latents))

    return LinearTokens, MLP, Resampler


def build_projection(adapter: ImageAdapter, *, load: bool = True):
    """The adapter's projection as a module (weights loaded unless ``load`` is False), float32, CPU, eval mode."""
    linear_tokens, mlp, resampler = _modules()
    if adapter.kind == "linear":
        module = linear_tokens(adapter.embed_dim, adapter.cross_dim, adapter.num_tokens)
    elif adapter.kind == "mlp":
        module = mlp(adapter.embed_dim, adapter.cross_dim)
    else:
        module = resampler(**adapter.config)
    if load:
        state = {k: v.float() for k, v in adapter.image_proj.items()}
        module.load_state_dict(state, strict=True)
    return module.float().eval()


def project(adapter: ImageAdapter, features, *, module=None):
    """Image tokens ``[B, N, cross_dim]`` (float32) for ``features`` (``image_embeds [B, E]``, hidden states
    ``[B, T, E]`` or face embeddings ``[B, 512]``)."""
    import torch  # noqa: PLC0415

    module = module if module is not None else build_projection(adapter)
    x = features.float()
    if adapter.kind == "resampler" and x.dim() == 2:
        x = x[:, None, :]
    with torch.no_grad():
        return module(x)


# ------------------------------------------------------------------------------------------------ the UNet side
def cross_attention_layers(unet) -> list[Any]:
    """The UNet's cross-attention modules in diffusers' processor order (the order of the adapter's layers)."""
    out = []
    for name in unet.attn_processors:
        path = name.removesuffix(".processor")
        if path.endswith("attn2"):
            out.append(unet.get_submodule(path))
    return out


def check_adapter_fits(adapter: ImageAdapter, unet, *, family_label: str = "", node: str | None = None,
                       input: str = "adapter_name") -> None:
    """Refuse an adapter made for another UNet (cross-attention width, layer count or widths)."""
    model = f"this {family_label} model" if family_label else "this model"
    if getattr(unet.config, "encoder_hid_dim_type", None) is not None or \
            getattr(unet, "encoder_hid_proj", None) is not None:
        # Kolors: the UNet's forward projects the whole context (4096 -> 2048 wide), image tokens included
        raise FinetuneError(f"{model} projects its text context inside the UNet (encoder_hid_proj), which image "
                            "prompt tokens cannot join", node=node, input="pipe",
                            fix="use image prompts with an SD 1.x / SD 2.x / SDXL model handle")
    layers = cross_attention_layers(unet)
    cross = int(unet.config.cross_attention_dim if not isinstance(unet.config.cross_attention_dim, (list, tuple))
                else unet.config.cross_attention_dim[0])
    if adapter.cross_dim != cross or len(adapter.ip_layers) != len(layers):
        raise FinetuneError(f"'{adapter.name}' is made for a UNet with {len(adapter.ip_layers)} cross-attention "
                            f"layers of context width {adapter.cross_dim}; {model} has {len(layers)} of width {cross}",
                            node=node, input=input, fix="use the adapter made for this model family "
                            "(SD 1.5 adapters for SD 1.x, SDXL adapters for SDXL)")
    for i, ((k, v), attn) in enumerate(zip(adapter.ip_layers, layers)):
        want = tuple(attn.to_k.weight.shape)
        if tuple(k.shape) != want or tuple(v.shape) != tuple(attn.to_v.weight.shape):
            raise FinetuneError(f"'{adapter.name}' layer {2 * i + 1} has key/value shape {tuple(k.shape)}, this "
                                f"model's cross-attention layer there is {want}", node=node, input=input,
                                fix="use the adapter made for this model (same architecture)")


def image_prompts(handle: ModelHandle) -> list[ImagePromptPatch]:
    """The handle's image prompts that do anything: strength 0 without a ControlNet is exactly no adapter (a
    ControlNet at a strength other than 0 still runs on the image tokens, its adapter adding nothing)."""
    return [p for p in handle.patches if isinstance(p, ImagePromptPatch)
            and (p.strength != 0 or (p.control is not None and p.control.strength != 0))]


class ImagePromptAttention:
    """Wraps a cross-attention layer's own processor: the text part runs unchanged on the context without the
    image tokens, then each image prompt's attention is added (after ``to_out``'s linear map)."""

    def __init__(self, original, segments: list[tuple[Any, Any, float, int]]) -> None:
        self.original = original
        self.segments = segments  # (to_k_ip, to_v_ip, strength, tokens) per image prompt, in context order
        self.tokens = sum(n for *_, n in segments)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        import torch.nn.functional as F  # noqa: N812, PLC0415

        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.tokens:
            raise RuntimeError("image prompt tokens missing from the cross-attention context")
        text, image = encoder_hidden_states[:, :-self.tokens], encoder_hidden_states[:, -self.tokens:]
        out = self.original(attn, hidden_states, text, attention_mask, temb, *args, **kwargs)
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        heads = attn.heads
        q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        total, start = None, 0
        for k_w, v_w, strength, n in self.segments:
            tok = image[:, start:start + n]
            start += n
            k = F.linear(tok, k_w).view(b, n, heads, -1).transpose(1, 2)
            v = F.linear(tok, v_w).view(b, n, heads, -1).transpose(1, 2)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            o = o.transpose(1, 2).reshape(b, -1, heads * o.shape[-1]) * strength
            total = o if total is None else total + o
        return out + F.linear(total.to(out.dtype), attn.to_out[0].weight) / attn.rescale_output_factor


@dataclass
class Attached:
    """Image prompts installed on a UNet for one call: builds the contexts and the ControlNet residuals."""

    prompts: list[ImagePromptPatch]
    device: Any
    dtype: Any
    pixel_scale: int = 8  # image pixels per latent pixel (the ControlNet hint is drawn at the image's size)
    hints: dict = field(default_factory=dict)  # (hint, size) -> the hint ready for the ControlNet

    def extend(self, context, uncond_rows: int = 0):
        """``context [B, L, D]`` with every prompt's tokens appended: the first ``uncond_rows`` rows get the
        unconditional tokens, the others the reference's."""
        import torch  # noqa: PLC0415

        b = context.shape[0]
        parts = [context]
        for p in self.prompts:
            tokens = torch.cat([p.uncond.expand(uncond_rows, -1, -1), p.cond.expand(b - uncond_rows, -1, -1)])
            parts.append(tokens.to(device=context.device, dtype=context.dtype))
        return torch.cat(parts, dim=1)

    def _hint(self, hint: ControlHint, model_in):
        """The hint image at the sampled image's size, on the UNet's device: resized and moved once per call."""
        import torch  # noqa: PLC0415

        size = (model_in.shape[-2] * self.pixel_scale, model_in.shape[-1] * self.pixel_scale)
        key = (id(hint), size)
        if key not in self.hints:
            image = hint.image.float()
            if tuple(image.shape[-2:]) != size:
                image = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            self.hints[key] = image.to(device=model_in.device, dtype=model_in.dtype)
        return self.hints[key]

    def unet_kwargs(self, model_in, t, context, added) -> dict:
        """ControlNet residuals for the UNet call (InstantID's keypoint ControlNet); ``{}`` without one."""
        down = mid = None
        end = context.shape[1]
        starts = []
        for p in reversed(self.prompts):
            end -= p.cond.shape[1]
            starts.append(end)
        starts.reverse()
        for p, start in zip(self.prompts, starts):
            if p.control is None:
                continue
            hint = p.control
            image = self._hint(hint, model_in).expand(model_in.shape[0], -1, -1, -1)
            tokens = context[:, start:start + p.cond.shape[1]]
            d, m = hint.controlnet(model_in, t, encoder_hidden_states=tokens, controlnet_cond=image,
                                   conditioning_scale=float(hint.strength), added_cond_kwargs=added,
                                   return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


@contextmanager
def attached(handle: ModelHandle) -> Iterator[Attached | None]:
    """Install the handle's image prompts on its UNet for the block (None when it has none); the UNet's own
    processors come back afterwards, also on errors."""
    prompts = image_prompts(handle)
    if not prompts:
        yield None
        return
    base = handle.base
    layers = cross_attention_layers(base.unet)
    dtype = base.dtype
    originals = [attn.processor for attn in layers]
    try:
        for j, attn in enumerate(layers):
            segments = [(p.adapter.ip_layers[j][0].to(device=base.device, dtype=dtype),
                         p.adapter.ip_layers[j][1].to(device=base.device, dtype=dtype),
                         float(p.strength), int(p.cond.shape[1])) for p in prompts]
            attn.processor = ImagePromptAttention(attn.processor, segments)
        for p in prompts:
            if p.control is not None:
                p.control.controlnet.to(device=base.device, dtype=dtype)
        yield Attached(prompts, base.device, dtype, base.vae_scale_factor)
    finally:
        for attn, original in zip(layers, originals):
            attn.processor = original
