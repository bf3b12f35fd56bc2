"""Sampling: ComfyUI sampler/scheduler names mapped to diffusers schedulers, and the denoising loop.

The loop is the plain text-to-image loop of diffusers' SD pipelines (scale the input,
predict, classifier-free guidance ``uncond + cfg * (cond - uncond)``, scheduler step), run
on our patched handle. Noise follows ComfyUI: the whole batch drawn on the CPU from
``torch.manual_seed(seed)``, so a seed gives the same image on any device and batch item
``i`` of a batch is reproducible. Every call builds a fresh scheduler (they keep state).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .conditioning import PromptEncoder, same_length, sdxl_added
from .errors import FinetuneError
from .image_prompt import attached

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .handle import ModelHandle

# ComfyUI sampler name -> (diffusers scheduler class, extra config): the diffusers scheduler that implements
# the same sampler as ComfyUI's k-diffusion one
SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "ddpm": ("DDPMScheduler", {}),
    # ComfyUI's uni_pc is the bh1 variant, but diffusers 0.42's bh1 update produces NaNs; bh2 is close.
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}

# ComfyUI scheduler name -> diffusers config options
SCHEDULES: dict[str, dict] = {
    "normal": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "ddim_uniform": {"timestep_spacing": "leading", "steps_offset": 1},
}

SAMPLER_NAMES = tuple(SAMPLERS)
MAX_SIDE = 16384
MAX_MEGAPIXELS = 256  # e.g. 16 images of 4096x4096; beyond that we refuse before allocating anything
SCHEDULER_NAMES = tuple(SCHEDULES)
_RESET_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def make_scheduler(base_config: dict, sampler: str, schedule: str, *, node: str | None = None):
    """A new diffusers scheduler for a ComfyUI sampler + scheduler pair over the model's noise schedule."""
    import diffusers  # noqa: PLC0415

    if sampler not in SAMPLERS:
        raise FinetuneError(f"unknown sampler '{sampler}'", node=node, input="sampler_name",
                            fix=f"use one of: {', '.join(SAMPLER_NAMES)}")
    if schedule not in SCHEDULES:
        raise FinetuneError(f"unknown scheduler '{schedule}'", node=node, input="scheduler",
                            fix=f"use one of: {', '.join(SCHEDULER_NAMES)}")
    cls_name, extra = SAMPLERS[sampler]
    cls = getattr(diffusers, cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    options = SCHEDULES[schedule]
    unsupported = [k for k, v in options.items() if k not in accepted and v is True]
    if unsupported:
        ok = [name for name, opts in SCHEDULES.items() if all(k in accepted or v is not True for k, v in opts.items())]
        raise FinetuneError(f"sampler '{sampler}' cannot use the '{schedule}' schedule", node=node, input="scheduler",
                            fix=f"with {sampler} use one of: {', '.join(ok)}")
    config = {k: v for k, v in base_config.items() if k not in _RESET_SIGMA_OPTIONS}
    config.update(extra)
    config.update({k: v for k, v in options.items() if k in accepted})
    return cls.from_config(config)


@dataclass
class SampleSettings:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    batch_size: int = 1

    def validate(self, node: str | None = None) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise FinetuneError(f"{name} {value} is not a positive multiple of 8", node=node, input=name,
                                    fix=f"use {max(8, (value // 8) * 8)} or {max(8, -(-value // 8) * 8)}")
            if value > MAX_SIDE:
                raise FinetuneError(f"{name} {value} is larger than {MAX_SIDE} pixels", node=node, input=name,
                                    fix="use the model's native size (512-1024) and upscale afterwards")
        megapixels = self.width * self.height * self.batch_size / 1e6
        if megapixels > MAX_MEGAPIXELS:
            raise FinetuneError(f"{self.width}x{self.height} x batch {self.batch_size} is {megapixels:.0f} "
                                f"megapixels per run, more than the {MAX_MEGAPIXELS} this node will allocate",
                                node=node, input="batch_size", fix="use a smaller size or batch_size and run again")
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise FinetuneError(f"cfg must be a finite number of 0 or more (got {self.cfg})", node=node, input="cfg",
                                fix="use 5-8 for most models, 1 for no guidance")
        if self.steps < 1:
            raise FinetuneError(f"steps must be at least 1 (got {self.steps})", node=node, input="steps",
                                fix="use 20-30 steps for most samplers")
        if self.batch_size < 1:
            raise FinetuneError(f"batch_size must be at least 1 (got {self.batch_size})", node=node,
                                input="batch_size", fix="use 1 or more")


def comfy_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's initial noise: CPU generator seeded with ``seed``, whole batch at once (comfy/sample.py)."""
    import torch  # noqa: PLC0415

    generator = torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def sample(handle: ModelHandle, s: SampleSettings, *, progress: Callable[[int, int], None] | None = None,
           node: str | None = None) -> torch.Tensor:
    """Generate images; returns ``[B, H, W, 3]`` float32 in 0..1 on the CPU (ComfyUI's IMAGE)."""
    s.validate(node)
    with handle.patched():
        return sample_patched(handle, s, progress=progress, node=node)


def sample_patched(handle: ModelHandle, s: SampleSettings, *, progress: Callable[[int, int], None] | None = None,
                   node: str | None = None) -> torch.Tensor:
    """:func:`sample` for a handle whose patches are already applied (e.g. validation during training)."""
    return sample_prompts_patched(handle, s, [(s.prompt, s.batch_size, s.seed)], progress=progress, node=node)[0]


def sample_prompts_patched(handle: ModelHandle, s: SampleSettings, prompts: Sequence[tuple[str, int, int]], *,
                           progress: Callable[[int, int], None] | None = None,
                           node: str | None = None) -> list[torch.Tensor]:
    """Several prompts in one batch (``s`` but for its prompt, seed and batch size): ``(prompt, count, seed)``
    each, with the noise Sample draws for that seed and count; returns each prompt's images. One batch runs the
    UNet once a step for all of them (in-loop scoring samples several prompts at every evaluation). Sampler noise
    (ancestral samplers) comes from the first prompt's seed, so for one prompt this is exactly Sample."""
    import torch  # noqa: PLC0415

    base = handle.base
    scheduler = make_scheduler(base.scheduler_config, s.sampler, s.scheduler, node=node)
    device, dtype = base.device, base.dtype
    counts = [int(n) for _, n, _ in prompts]
    with torch.inference_mode(), attached(handle) as image_prompts:
        encoder = PromptEncoder(handle, node=node)
        pos = [encoder.encode(p) for p, _, _ in prompts]
        neg = encoder.encode(s.negative or "")
        *conds, uncond = same_length([c.cond for c in pos] + [neg.cond])
        use_cfg = s.cfg != 1.0
        b = sum(counts)
        cond = torch.cat([c.expand(n, -1, -1) for c, n in zip(conds, counts)])
        context = torch.cat([uncond.expand(b, -1, -1), cond]) if use_cfg else cond
        added = None
        if base.info.size_conditioning:
            pooled = [torch.cat([c.pooled.expand(n, -1) for c, n in zip(pos, counts)])]
            if use_cfg:
                pooled.insert(0, neg.pooled.expand(b, -1))
            added = sdxl_added(torch.cat(pooled), s.height, s.width, dtype, device)
        if image_prompts is not None:  # the image tokens ride at the end of the context (none for strength 0)
            context = image_prompts.extend(context, uncond_rows=b if use_cfg else 0)
        context = context.to(device=device, dtype=dtype)

        scheduler.set_timesteps(s.steps, device=device)
        shape = (base.unet.config.in_channels, s.height // base.vae_scale_factor, s.width // base.vae_scale_factor)
        latents = torch.cat([comfy_noise(seed, (n, *shape)) for (_, n, seed) in prompts])
        latents = latents.to(device) * scheduler.init_noise_sigma
        step_gen = torch.Generator("cpu").manual_seed(int(prompts[0][2]) & 0xFFFF_FFFF_FFFF_FFFF)
        timesteps = scheduler.timesteps
        accepts_gen = "generator" in inspect.signature(scheduler.step).parameters
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t).to(dtype)
            extra = {} if image_prompts is None else image_prompts.unet_kwargs(model_in, t, context, added)
            pred = base.unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added, **extra).sample
            pred = pred.float()
            if use_cfg:
                p_uncond, p_cond = pred.chunk(2)
                pred = p_uncond + s.cfg * (p_cond - p_uncond)
            kwargs = {"generator": step_gen} if accepts_gen else {}
            latents = scheduler.step(pred, t, latents, **kwargs).prev_sample
            if progress is not None:
                progress(i + 1, len(timesteps))
        return list(decode(handle, latents).split(counts))


# The VAE decodes in overlapping tiles (diffusers' tiled decode, blended seams) when an image side is more than
# TILE_ABOVE times the size the VAE was trained at (its config's sample_size: 512 px for SD 1.x, 1024 px for SDXL):
# untiled, the decoder's full-resolution activations grow with the area (several GB at 2048 px).
TILE_ABOVE = 2
# Decoding slices the batch so that a slice holds at most DECODE_PIXELS pixels (one 1024 x 1024 image, what SDXL's
# native size decodes at anyway): VAE memory stays that of one such image whatever the batch, while small images
# decode together (one 64 px image at a time made Sample 10-12 % slower than diffusers at batch 8 on a tiny model).
DECODE_PIXELS = 1024 * 1024


def vae_tiling_needed(vae, height: int, width: int) -> bool:
    """Whether :func:`decode` tiles an image of ``height`` x ``width`` pixels."""
    native = getattr(vae.config, "sample_size", 512)
    native = int(max(native) if isinstance(native, (list, tuple)) else native or 512)
    return max(height, width) > TILE_ABOVE * native


def decode(handle: ModelHandle, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode scaled latents to a ``[B, H, W, 3]`` 0..1 CPU float32 image batch.

    Sliced (at most :data:`DECODE_PIXELS` pixels a slice, so VAE memory does not grow with the batch) and, above
    :data:`TILE_ABOVE` x the VAE's native size, tiled one image at a time; the VAE's own tiling flag is put back
    afterwards (the model is shared). The same batch always decodes in the same slices (bit-identical reruns).
    """
    import torch  # noqa: PLC0415

    vae = handle.base.vae
    vae_dtype = next(vae.parameters()).dtype
    scale = handle.base.vae_scale_factor
    tiled = vae_tiling_needed(vae, latents.shape[-2] * scale, latents.shape[-1] * scale)
    per_slice = 1 if tiled else max(1, DECODE_PIXELS // (latents.shape[-2] * latents.shape[-1] * scale * scale))
    was_tiling = bool(getattr(vae, "use_tiling", False))
    with torch.inference_mode():
        out = []
        try:
            if tiled and hasattr(vae, "enable_tiling"):
                vae.enable_tiling()
            for chunk in latents.split(per_slice):
                x = vae.decode(chunk.to(vae_dtype) / vae.config.scaling_factor).sample
                out.append(x.float())
        finally:
            if hasattr(vae, "use_tiling"):
                vae.use_tiling = was_tiling
        images = torch.cat(out)
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()
