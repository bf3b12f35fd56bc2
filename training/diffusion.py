"""The denoising objective every trainer shares, plus latent and text caches.

The loss follows the noise schedule the model samples with (DDPM betas from the model's
scheduler config) and its prediction type: epsilon models regress the noise, v-prediction
models the velocity ``alpha_t * noise - sigma_t * x0``. Optional min-SNR-gamma weighting
(Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") and noise
offset (crosslabs' "diffusion with offset noise").

:class:`LatentCache` / :class:`TextCache` keep encodings in memory and, with a :class:`DiskCache`, as safetensors
files under ``host.cache_dir()``, keyed by the model's identity (source, dtype, a fingerprint of the encoder
weights, patches) and the exact input (a hash of the prepared pixels - so the file content, resolution, crop and
flip - or of the caption), so a re-run skips the VAE and text encoders. An objective declares its caches; the
training frame configures them (disk, offload) and fills them before it offloads the frozen encoders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import host
from ..core.atomic import atomic_write
from ..core.conditioning import PromptEncoder, sdxl_added, stack_conds
from ..core.errors import FinetuneError
from ..core.handle import ModelHandle
from ..core.safeio import load_safetensors
from . import distributed
from .data import TrainingSet, join_caption
from .settings import TrainSettings
from .speed import Offload, is_channels_last, on_device

log = logging.getLogger("comfy_finetune")
CACHE_FORMAT = 1  # bump when what is cached (or how it is computed) changes: old entries are then never read


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


# ---------------------------------------------------------------------------------------------- caches
def _fingerprint(modules: list[torch.nn.Module]) -> str:
    """A cheap content fingerprint of module weights (sums in float64: two different models never share it)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(p.detach().double().sum())!r}".encode())
    return h.hexdigest()[:20]


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()[:32]


class DiskCache:
    """safetensors files ``<host.cache_dir()>/<kind>/<model key>/<item key>.safetensors``, written atomically.

    A file that cannot be read is treated as a miss (and replaced); a write that fails (full disk, read-only
    folder) is logged and training goes on from memory.
    """

    def __init__(self, kind: str, model_key: str) -> None:
        self.folder = Path(host.cache_dir()) / kind / model_key
        self.hits = self.misses = 0
        self._warned = False

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            out, _ = load_safetensors(path)  # header checked before anything is allocated
        except Exception:  # noqa: BLE001 - damaged file: recompute and overwrite
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file  # noqa: PLC0415 - heavy at start-up

        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            atomic_write(self.path(key), lambda tmp: save_file(data, str(tmp), metadata={"format": str(CACHE_FORMAT)}))
        except (OSError, FinetuneError) as exc:
            if not self._warned:
                log.warning("could not write the encoding cache in %s (%s); going on without it", self.folder, exc)
                self._warned = True


def _model_identity(handle: ModelHandle) -> list:
    return [CACHE_FORMAT, handle.signature(), handle.base.device.type]


def latent_disk_cache(handle: ModelHandle) -> DiskCache:
    """The disk cache for ``handle``'s VAE encodings (keyed by source, dtype, device type and encoder weights)."""
    vae = handle.base.vae
    parts = [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]
    key = _digest(_model_identity(handle), str(next(vae.parameters()).dtype), _fingerprint(parts),
                  float(vae.config.scaling_factor))
    return DiskCache("latents", key)


def text_disk_cache(handle: ModelHandle) -> DiskCache:
    """The disk cache for ``handle``'s caption encodings (text encoders' weights and the handle's patches)."""
    base = handle.base
    toks = [len(t) for t in base.tokenizers]
    key = _digest(_model_identity(handle), base.family.value, toks, _fingerprint(list(base.text_encoders)))
    return DiskCache("text", key)


class TextCache:
    """Caption → conditioning, computed once while the text encoders are frozen (and kept on disk).

    ``prompts`` are the captions the run will encode, so :meth:`fill` can encode them all before the text encoders
    leave the device. With ``cache=False`` (the text encoders train, or carry an embedding's gradient) every
    caption is encoded afresh each step, with gradients.
    """

    def __init__(self, handle: ModelHandle, node: str, *, cache: bool = True, prompts: Iterable[str] = ()) -> None:
        self.handle = handle
        self.encoder = PromptEncoder(handle, node=node, input="captions")
        self.cache = cache
        self.prompts = list(dict.fromkeys(prompts))
        self.disk_enabled = False
        self.disk: DiskCache | None = None
        self.offload: Offload | None = None
        self._memo: dict[str, tuple] = {}

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The encoders a cache miss runs."""
        return list(self.handle.base.text_encoders)

    def configure(self, *, disk: bool, offload: Offload | None) -> None:
        """Keep encodings on disk too (``disk``); bring offloaded encoders back for a miss (``offload``)."""
        self.disk_enabled = disk and self.cache
        self.offload = offload

    def _disk(self) -> DiskCache | None:
        # built on first use: it fingerprints the text encoders as they are when encoding (patches applied)
        if self.disk_enabled and self.disk is None:
            self.disk = text_disk_cache(self.handle)
        return self.disk

    def _encode_cached(self, text: str) -> tuple:
        device = self.handle.base.device
        disk = self._disk()
        key = _digest(text) if disk is not None else ""
        hit = disk.get(key) if disk is not None else None
        if hit is not None:
            c, p = hit["cond"].to(device), (hit["pooled"].to(device) if "pooled" in hit else None)
        else:
            with torch.no_grad(), on_device(self.offload, self.modules):
                enc = self.encoder.encode(text)
            c, p = enc.cond.detach(), (enc.pooled.detach() if enc.pooled is not None else None)
            if disk is not None:
                disk.put(key, {"cond": c, **({"pooled": p} if p is not None else {})})
        self._memo[text] = (c, p)
        return c, p

    def fill(self) -> bool:
        """Encode every expected caption now (before the text encoders are offloaded); False when not caching."""
        if not self.cache:
            return False
        for text in self.prompts:
            if text not in self._memo:
                self._encode_cached(text)
        return True

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        conds, pooled = [], []
        for text in captions:
            if self.cache:
                c, p = self._memo[text] if text in self._memo else self._encode_cached(text)
            else:
                enc = self.encoder.encode(text)
                c, p = enc.cond, enc.pooled
            conds.append(c)
            pooled.append(p)
        pooled_t = torch.cat(pooled) if pooled and pooled[0] is not None else None
        return stack_conds(conds), pooled_t


class LatentCache:
    """VAE latents (scaled) per example and flip, encoded once (and kept on disk, keyed by the pixels' hash);
    random crops are encoded per batch."""

    def __init__(self, handle: ModelHandle, dataset: TrainingSet) -> None:
        self.handle = handle
        self.vae = handle.base.vae
        self.device = handle.base.device
        self.dataset = dataset
        self.disk_enabled = False
        self.disk: DiskCache | None = None
        self.offload: Offload | None = None
        self._memo: dict[tuple[int, bool], torch.Tensor] = {}

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The encoder a cache miss (or a random crop) runs."""
        return [self.vae]

    def configure(self, *, disk: bool, offload: Offload | None) -> None:
        """Keep latents on disk too (``disk``); bring an offloaded VAE back for a miss (``offload``)."""
        self.disk_enabled = disk
        self.offload = offload

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with on_device(self.offload, self.modules):
            dtype = next(self.vae.parameters()).dtype
            dist = self.vae.encode(pixels.to(device=self.device, dtype=dtype)).latent_dist
            return (dist.mean * self.vae.config.scaling_factor).float()

    @property
    def cacheable(self) -> bool:
        return not self.dataset.random_crop

    def _one(self, index: int, flipped: bool, px: torch.Tensor) -> torch.Tensor:
        key = (int(index), bool(flipped))
        if key in self._memo:
            return self._memo[key]
        if self.disk_enabled and self.disk is None:
            self.disk = latent_disk_cache(self.handle)
        digest = tensor_digest(px) if self.disk is not None else ""
        hit = self.disk.get(digest) if self.disk is not None else None
        if hit is not None:
            latent = hit["latent"]
        else:
            latent = self._encode(px.unsqueeze(0).clone())[0]
            if self.disk is not None:
                self.disk.put(digest, {"latent": latent})
        # While the frozen modules are offloaded the whole set is encoded up front (class images too): keep it in
        # host memory then and move each batch to the device, so the device holds only the batch.
        latent = latent.to("cpu" if self.offload is not None else self.device)
        self._memo[key] = latent
        return latent

    def fill(self) -> bool:
        """Encode every example (and its mirror image when the set flips) now; False with random crops."""
        if not self.cacheable:
            return False
        flips = (False, True) if self.dataset.flip else (False,)
        for i, ex in enumerate(self.dataset.examples):
            host.check_interrupt()  # a large class-image set takes a while: cancel works here too
            for flipped in flips:
                self._one(i, flipped, ex.pixels.flip(-1) if flipped else ex.pixels)
        return True

    def latents(self, batch) -> torch.Tensor:
        if not self.cacheable:
            return self._encode(batch.pixels.clone())
        return torch.stack([self._one(i, f, px) for i, f, px in zip(batch.indices, batch.flipped, batch.pixels)]
                           ).to(self.device)


Cache = TextCache | LatentCache


def dataset_captions(dataset: TrainingSet) -> list[str]:
    """Every caption the set can produce: each example's (with the prefix), and "" when captions drop out."""
    out = [join_caption(dataset.caption_prefix, ex.caption) for ex in dataset.examples]
    if dataset.caption_dropout > 0:
        out.append("")
    return out


def denoise_loss(unet, latents: torch.Tensor, context: torch.Tensor, schedule: NoiseSchedule, *,
                 generator: torch.Generator, added: dict | None = None, noise_offset: float = 0.0,
                 min_snr_gamma: float = 0.0, timesteps: torch.Tensor | None = None,
                 target_fn=None, min_timestep: int = 0) -> torch.Tensor:
    """Per-sample diffusion loss ``[B]``: noise the latents at random timesteps and regress the model's target.

    ``target_fn(noisy, t)`` replaces the usual target (used by prior preservation against the frozen model).
    ``min_timestep`` draws the random timesteps from ``[min_timestep, num_timesteps)`` only (0: all, the same draws
    as before it existed).
    """
    b = latents.shape[0]
    device = latents.device
    noise = distributed.randn(latents.shape, generator).to(device)
    if noise_offset:
        noise = noise + noise_offset * distributed.randn((b, latents.shape[1], 1, 1), generator).to(device)
    if timesteps is None:
        timesteps = distributed.randint(schedule.num_timesteps - min_timestep, b, generator).to(device) + min_timestep
    noisy = schedule.scheduler.add_noise(latents, noise, timesteps)
    if target_fn is not None:
        target = target_fn(noisy, timesteps)
    elif schedule.prediction_type == "v_prediction":
        target = schedule.scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    dtype = next(unet.parameters()).dtype
    noisy = noisy.to(dtype)
    if is_channels_last(unet):
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    pred = unet(noisy, timesteps, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = schedule.snr(timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma)
        weight = weight / (snr + 1) if schedule.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss


def caption_losses(denoiser, handle: ModelHandle, text: TextCache, schedule: NoiseSchedule, settings: TrainSettings,
                   latents: torch.Tensor, captions: list[str], height: int, width: int, generator: torch.Generator,
                   target_fn=None) -> torch.Tensor:
    """Per-sample denoising losses ``[B]`` of ``denoiser`` for ``latents`` captioned ``captions`` (encoded by
    ``handle``'s text encoders through ``text``), with the settings' noise offset and min-SNR weighting."""
    context, added = conditioning_for(handle, text, list(captions), int(height), int(width))
    return denoise_loss(denoiser, latents, context, schedule, generator=generator, added=added,
                        noise_offset=settings.noise_offset, min_snr_gamma=settings.min_snr_gamma,
                        target_fn=target_fn)


def conditioning_for(handle: ModelHandle, text: TextCache, captions: list[str], height: int, width: int):
    """(context, added_cond_kwargs) for a batch of captions."""
    cond, pooled = text.encode(captions)
    base = handle.base
    cond = cond.to(device=base.device)
    added = None
    if base.info.size_conditioning:
        added = sdxl_added(pooled, height, width, base.dtype, base.device)
    return cond, added


@torch.no_grad()
def evaluation_loss(handle: ModelHandle, dataset: TrainingSet, *, seed: int = 1234,
                    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), apply_patches: bool = True) -> float:
    """Mean denoising loss of ``handle`` (patches applied) over every example at fixed timesteps and noise.

    Unlike the training loss (random timesteps), this is comparable between two models, so tests and
    benchmarks use it to check that training taught something, and the held-out loss of in-loop scoring is it.
    ``apply_patches=False``: the handle's LoRAs are already merged (inside training).
    """
    schedule = NoiseSchedule(handle.base.scheduler_config, handle.base.prediction_type)
    total, count = 0.0, 0
    with handle.patched() if apply_patches else contextlib.nullcontext():
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
