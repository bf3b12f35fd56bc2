"""The denoising objective every trainer shares, plus latent and text caches.

The loss follows the noise schedule the model samples with (DDPM betas from the model's
scheduler config) and its prediction type: epsilon models regress the noise, v-prediction
models the velocity ``alpha_t * noise - sigma_t * x0``. Optional min-SNR-gamma weighting
(Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") and noise
offset (crosslabs' "diffusion with offset noise").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..core.conditioning import PromptEncoder
from ..core.families import Family

if TYPE_CHECKING:  # pragma: no cover
    from ..core.handle import ModelHandle
    from .data import TrainingSet


class NoiseSchedule:
    """Training-time view of the model's DDPM schedule."""

    def __init__(self, scheduler_config: dict, prediction_type: str) -> None:
        from diffusers import DDPMScheduler  # noqa: PLC0415

        cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("use_")}
        cfg["prediction_type"] = prediction_type
        self.scheduler = DDPMScheduler.from_config(cfg)
        self.prediction_type = prediction_type
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)


def stack_conds(conds: list[torch.Tensor]) -> torch.Tensor:
    """Stack [1, L_i, D] conditionings of different chunk counts by repetition (ComfyUI does the same)."""
    lengths = {c.shape[1] for c in conds}
    if len(lengths) > 1:
        lcm = 1
        for n in lengths:
            lcm = lcm * n // math.gcd(lcm, n)
        conds = [c.repeat(1, lcm // c.shape[1], 1) for c in conds]
    return torch.cat(conds)


def sdxl_added(pooled: torch.Tensor, height: int, width: int, dtype, device) -> dict:
    """SDXL's extra conditioning: pooled text embedding and (orig size, crop, target size) ids."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(pooled.shape[0], 1)
    return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids}


class TextCache:
    """Caption → conditioning, computed once while the text encoders are frozen."""

    def __init__(self, handle: "ModelHandle", node: str, *, cache: bool = True) -> None:
        self.encoder = PromptEncoder(handle, node=node, input="captions")
        self.cache = cache
        self._memo: dict[str, tuple] = {}

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        conds, pooled = [], []
        for text in captions:
            if self.cache and text in self._memo:
                c, p = self._memo[text]
            else:
                if self.cache:
                    with torch.no_grad():
                        enc = self.encoder.encode(text)
                    c, p = enc.cond.detach(), (enc.pooled.detach() if enc.pooled is not None else None)
                    self._memo[text] = (c, p)
                else:
                    enc = self.encoder.encode(text)
                    c, p = enc.cond, enc.pooled
            conds.append(c)
            pooled.append(p)
        pooled_t = torch.cat(pooled) if pooled and pooled[0] is not None else None
        return stack_conds(conds), pooled_t


class LatentCache:
    """VAE latents (scaled) per example and flip, encoded once; random crops are encoded per batch."""

    def __init__(self, handle: "ModelHandle", dataset: "TrainingSet") -> None:
        self.vae = handle.base.vae
        self.device = handle.base.device
        self.dataset = dataset
        self._memo: dict[tuple[int, bool], torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(device=self.device, dtype=dtype)).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).float()

    def latents(self, batch) -> torch.Tensor:
        if getattr(self.dataset, "random_crop", False):
            return self._encode(batch.pixels.clone())
        out = []
        for i, flipped, px in zip(batch.indices, batch.flipped, batch.pixels):
            key = (int(i), bool(flipped))
            if key not in self._memo:
                self._memo[key] = self._encode(px.unsqueeze(0).clone())[0]
            out.append(self._memo[key])
        return torch.stack(out)


def denoise_loss(unet, latents: torch.Tensor, context: torch.Tensor, schedule: NoiseSchedule, *,
                 generator: torch.Generator, added: dict | None = None, noise_offset: float = 0.0,
                 min_snr_gamma: float = 0.0, timesteps: torch.Tensor | None = None,
                 target_fn=None) -> torch.Tensor:
    """Per-sample diffusion loss ``[B]``: noise the latents at random timesteps and regress the model's target.

    ``target_fn(noisy, t)`` replaces the usual target (used by prior preservation against the frozen model).
    """
    from . import distributed  # noqa: PLC0415 - data-parallel ranks draw the global batch's noise and slice it

    b = latents.shape[0]
    device = latents.device
    noise = distributed.randn(latents.shape, generator).to(device)
    if noise_offset:
        noise = noise + noise_offset * distributed.randn((b, latents.shape[1], 1, 1), generator).to(device)
    if timesteps is None:
        timesteps = distributed.randint(schedule.num_timesteps, b, generator).to(device)
    noisy = schedule.scheduler.add_noise(latents, noise, timesteps)
    if target_fn is not None:
        target = target_fn(noisy, timesteps)
    elif schedule.prediction_type == "v_prediction":
        target = schedule.scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    dtype = next(unet.parameters()).dtype
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = schedule.snr(timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma)
        weight = weight / (snr + 1) if schedule.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss


def conditioning_for(handle: "ModelHandle", text: TextCache, captions: list[str], height: int, width: int):
    """(context, added_cond_kwargs) for a batch of captions."""
    cond, pooled = text.encode(captions)
    base = handle.base
    cond = cond.to(device=base.device)
    added = None
    if base.family is Family.SDXL:
        added = sdxl_added(pooled, height, width, base.dtype, base.device)
    return cond, added


@torch.no_grad()
def evaluation_loss(handle: "ModelHandle", dataset: "TrainingSet", *, seed: int = 1234,
                    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> float:
    """Mean denoising loss of ``handle`` (patches applied) over every example at fixed timesteps and noise.

    Unlike the training loss (random timesteps), this is comparable between two models, so tests and
    benchmarks use it to check that training taught something.
    """
    schedule = NoiseSchedule(handle.base.scheduler_config, handle.base.prediction_type)
    total, count = 0.0, 0
    with handle.patched():
        text = TextCache(handle, "evaluation")
        cache = LatentCache(handle, dataset)
        for i, ex in enumerate(dataset.examples):
            batch = type("B", (), {"indices": [i], "flipped": [False], "pixels": ex.pixels.unsqueeze(0)})()
            latents = cache.latents(batch).to(handle.base.device)
            h, w = ex.pixels.shape[-2:]
            context, added = conditioning_for(handle, text, [dataset.caption(i, _NoDropout())], int(h), int(w))
            for t in timesteps:
                gen = torch.Generator("cpu").manual_seed(seed + 7919 * i + t)
                tt = torch.full((1,), t, dtype=torch.long, device=latents.device)
                total += float(denoise_loss(handle.base.unet, latents, context, schedule, generator=gen, added=added,
                                            timesteps=tt)[0])
                count += 1
    return total / max(count, 1)


class _NoDropout:
    """A random source for TrainingSet.caption that never drops the caption."""

    def random(self) -> float:
        return 1.0
