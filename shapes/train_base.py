"""Train ``shapes-tiny``: a tiny text-to-image model of the SD 1.x architecture that knows the shapes world.

    python -m comfy_finetune.shapes.train_base --out shapes/shapes-tiny      # about 50 min on 2 CPU cores

What it builds (a diffusers folder, the layout ``StableDiffusionPipeline`` reads):

* ``tokenizer/``: a CLIP BPE tokenizer whose whole words are the world's caption words plus ``shape`` (the class
  word for any shape) and ``sks`` (a rare word no caption uses: the DreamBooth identifier, as in real SD models);
  any other text still tokenizes, character by character.
* ``vae/``: an ``AutoencoderKL`` with three blocks (64x64 pixels <-> 4x16x16 latents), trained as the image codec on
  every combination of the world, held-out ones included: like SD's VAE it is a generic codec and knows no words.
* ``text_encoder/`` + ``unet/``: a CLIP text encoder, first pretrained to name each caption's attributes (see
  :func:`pretrain_text_encoder`), and a ``UNet2DConditionModel`` (epsilon prediction, SD's scaled-linear
  schedule), then trained together from scratch on :func:`~comfy_finetune.shapes.world.training_specs` only.
  Captions vary the way people write prompts (full caption, without the background, without the colour, the
  shape named ``shape``, and empty for classifier-free guidance), so partial prompts and CFG work. The weights
  saved are an exponential moving average of the trained ones (as most diffusion models ship): it samples
  cleaner than the last step's weights after the same training.
* ``metrics.json``: the settings, the world fingerprint, the loss curve summary and the judged accuracy of samples
  (through the pack's own sampler) on the training prompts and on the compositional probes; ``--eval-every``
  logs a quick judged accuracy of the averaged weights during training.

Everything is seeded: the same ``--seed`` and thread count give the same weights (``--threads`` fixes it; float
sums on a different core count may round differently).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_write
from ..core.families import default_scheduler_config
from ..core.handle import ModelHandle
from ..core.loading import load_diffusers_folder
from ..core.sampling import SampleSettings, sample
from ..core.tiny import text_config
from ..core.tokenizer import build_vocab, load_tokenizer, write_tokenizer
from . import world as W
from .judge import accuracy, load_judge

MODEL_NAME = "shapes-tiny"
SIZE = 64
EXTRA_WORDS = ("shape", "sks")


@dataclass
class BaseTrainConfig:
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_small_steps: int = 1200   # the first steps train on the world drawn at 32x32: 4x cheaper, same job
    vae_fg_weight: float = 1.0    # extra loss weight on shape pixels (they are ~15% of an image)
    vae_pool: int = 3072          # images the VAE trains on (all combinations, random seeds)
    kl_weight: float = 1e-6
    per_spec: int = 16            # training images per training spec for the UNet
    unet_steps: int = 12000
    unet_batch: int = 24
    ema_decay: float = 0.999      # saved weights: EMA of the trained ones (bias-corrected warm-up)
    eval_every: int = 2000        # quick judged accuracy of the EMA weights during training (0: never)
    unet_lr: float = 2e-3
    warmup: int = 100
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.3     # per-channel constant added to the noise (see train_unet)
    text_hidden: int = 64
    unet_channels: tuple[int, ...] = (32, 64, 64)
    head_dim: int = 16            # attention width per head (diffusers' SD 1.x config counts heads instead)
    text_lr_scale: float = 0.3    # text encoder learning rate / unet_lr during diffusion training
    text_pre_steps: int = 300     # text encoder pretraining (see pretrain_text_encoder)
    text_pre_batch: int = 64
    eval_per_spec: int = 1
    eval_steps: int = 20
    eval_cfg: float = 5.0


# ------------------------------------------------------------------------------------------------------- captions
def caption_variant(spec: W.Spec, r: float, r2: float) -> str:
    """The caption people might write for ``spec``: ``r`` picks the form, ``r2`` breaks ties. Used for training."""
    return caption_and_labels(spec, r, r2)[0]


def caption_and_labels(spec: W.Spec, r: float, r2: float) -> tuple[str, tuple[int, int, int]]:
    """:func:`caption_variant` and the (shape, colour, background) it names: indices into the world's lists, or
    the list's length where the caption leaves it open."""
    caption = _variant(spec, r, r2)
    words = set(caption.split())
    return caption, (W.SHAPES.index(spec.shape) if spec.shape in words else len(W.SHAPES),
                     W.COLORS.index(spec.color) if spec.color in words else len(W.COLORS),
                     W.BACKGROUNDS.index(spec.background) if "background" in words else len(W.BACKGROUNDS))


def _variant(spec: W.Spec, r: float, r2: float) -> str:
    colour, shape, bg = spec.color, spec.shape, spec.background
    art = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
    on_bg = f" on {art(bg)} {bg} background"
    if r < 0.50:
        return spec.caption()
    if r < 0.62:
        return f"{art(colour)} {colour} {shape}"
    if r < 0.72:
        return f"{art(shape)} {shape}{on_bg}"
    if r < 0.82:
        return f"{art(colour)} {colour} shape{on_bg}" if r2 < 0.5 else f"{art(colour)} {colour} shape"
    if r < 0.90:
        return f"{art(shape)} {shape}" if r2 < 0.7 else f"a shape{on_bg}"
    return ""


# ------------------------------------------------------------------------------------------------------- models
def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=16, sample_size=SIZE)


def unet_config(cfg: BaseTrainConfig) -> dict:
    ch = tuple(cfg.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1)
    return dict(sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=ch,
                down_block_types=down, up_block_types=up, cross_attention_dim=cfg.text_hidden,
                attention_head_dim=tuple(max(1, c // cfg.head_dim) for c in ch), norm_num_groups=32)


def write_tokenizer_folder(folder: Path) -> None:
    vocab, merges = build_vocab(list(W.vocabulary()) + list(EXTRA_WORDS))
    write_tokenizer(folder, vocab, merges)


# ------------------------------------------------------------------------------------------------------- training
def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1


def train_vae(cfg: BaseTrainConfig, log) -> tuple[object, float]:
    """The codec: MSE + a light KL, on every combination of the world. Returns (vae, latent scaling factor)."""
    import torch
    from diffusers import AutoencoderKL

    rng = np.random.default_rng([cfg.seed, 1])
    specs = W.all_specs()
    picks = rng.integers(0, len(specs), cfg.vae_pool)
    seeds = [W.example_seed(specs[i], j, "vae") for j, i in enumerate(picks)]
    pool = _to_tensor(W.render_batch([specs[i] for i in picks], seeds))
    small = _to_tensor(W.render_batch([specs[i] for i in picks], seeds, size=SIZE // 2))
    torch.manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(
        math.pi * min(s, cfg.vae_steps) / cfg.vae_steps)))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    t0 = time.perf_counter()
    for step in range(cfg.vae_steps):
        idx = torch.from_numpy(rng.integers(0, len(pool), cfg.vae_batch))
        x = (small if step < cfg.vae_small_steps else pool)[idx]
        # shape pixels weigh more: they differ from the image's corner (background) colour
        fg = ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1).float()
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        err = (rec - x) * (1 + cfg.vae_fg_weight * fg)
        loss = err.pow(2).mean() + err.abs().mean() + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step + 1}/{cfg.vae_steps} loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(pool[i:i + 256]).latent_dist.mean for i in range(0, min(1024, len(pool)), 256)])
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    return vae, scale


def pretrain_text_encoder(cfg: BaseTrainConfig, te, tok, items, log) -> None:
    """Teach the text encoder to name what a caption says before the UNet learns to listen.

    A stand-in for CLIP's contrastive pretraining, which is why SD's padding positions already summarise the
    prompt: small linear heads read the shape, colour and background (or "not said") of the caption from every
    position from the end-of-text token on. Without it the UNet sees an untrained encoder whose padding says
    nothing and learns to draw shapes long before it learns to listen to words.
    """
    import torch
    import torch.nn.functional as F

    hidden = te.config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, len(W.SHAPES) + 1),
                                 torch.nn.Linear(hidden, len(W.COLORS) + 1),
                                 torch.nn.Linear(hidden, len(W.BACKGROUNDS) + 1)])
    opt = torch.optim.Adam(list(te.parameters()) + list(heads.parameters()), lr=3e-3)
    rng = np.random.default_rng([cfg.seed, 3])
    eos = tok.eos_token_id
    for step in range(cfg.text_pre_steps):
        idx = rng.integers(0, len(items), cfg.text_pre_batch)
        r = rng.random((cfg.text_pre_batch, 2))
        pairs = [caption_and_labels(items[i][0], a, b) for i, (a, b) in zip(idx, r)]
        ids = tok([c for c, _ in pairs], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        labels = torch.tensor([lab for _, lab in pairs])                       # [B, 3]
        states = te(ids).last_hidden_state                                     # [B, 77, H]
        mask = (ids == eos).float()                                            # the end-of-text token and padding
        loss = 0.0
        for k, head in enumerate(heads):
            logits = head(states)                                              # [B, 77, C]
            ce = F.cross_entropy(logits.transpose(1, 2), labels[:, k:k + 1].expand(-1, 77), reduction="none")
            loss = loss + (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.text_pre_steps - 1:
            log(f"text encoder step {step + 1}/{cfg.text_pre_steps} loss {loss.item():.4f}")


def train_unet(cfg: BaseTrainConfig, vae, tokenizer_folder: Path, log) -> tuple[object, object, list[float]]:
    """Text encoder + UNet from scratch on cached latents of the training specs.

    Offset noise (a random constant per image and channel added to the noise, kohya's ``noise_offset``) is what
    makes backgrounds follow the prompt. A background fills the image, so it is the latent's mean; the mean of
    16x16 unit noise has a standard deviation of only 1/16, and under SD's schedule even the last timestep keeps
    ``sqrt(alphas_cumprod[999]) = 0.07`` of the signal: the image mean is readable from x_t at every timestep, the
    UNet never needs the text for it, and at sampling the background follows the starting noise's mean instead of
    the words. An offset of 0.3 hides the mean at about a third of the timesteps (its signal-to-noise ratio < 1).
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = load_tokenizer(tokenizer_folder)
    specs = W.training_specs()
    items = [(s, W.example_seed(s, i, "train")) for s in specs for i in range(cfg.per_spec)]
    pixels = _to_tensor(W.render_batch([s for s, _ in items], [seed for _, seed in items]))
    scale = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean
                             for i in range(0, len(pixels), 256)]) * scale

    torch.manual_seed(cfg.seed + 3)
    te = CLIPTextModel(CLIPTextConfig(**text_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.eos_token_id,
                                                    hidden=cfg.text_hidden)))
    pretrain_text_encoder(cfg, te, tok, items, log)
    torch.manual_seed(cfg.seed + 4)
    unet = UNet2DConditionModel(**unet_config(cfg))
    sched_cfg = default_scheduler_config("sd1", "epsilon")
    ddpm = DDPMScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"], beta_start=sched_cfg["beta_start"],
                         beta_end=sched_cfg["beta_end"], beta_schedule=sched_cfg["beta_schedule"])
    alphas = ddpm.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(te.parameters())
    te.requires_grad_(cfg.text_lr_scale > 0)
    groups = [{"params": list(unet.parameters())}]
    if cfg.text_lr_scale > 0:
        groups.append({"params": list(te.parameters()), "lr": cfg.unet_lr * cfg.text_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.unet_steps) / cfg.unet_steps))))
    rng = np.random.default_rng([cfg.seed, 2])
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    losses: list[float] = []
    token_ids: dict[str, torch.Tensor] = {}  # a few hundred distinct captions: tokenize each once

    def ids_of(captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in token_ids:
                token_ids[c] = tok(c, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids[0]
        return torch.stack([token_ids[c] for c in captions])

    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    pairs = list(zip(ema_unet.parameters(), unet.parameters())) + list(zip(ema_te.parameters(), te.parameters()))
    t0 = time.perf_counter()
    unet.train()
    te.train()
    for step in range(cfg.unet_steps):
        idx = rng.integers(0, len(items), cfg.unet_batch)
        r = rng.random((cfg.unet_batch, 2))
        captions = [caption_variant(items[i][0], a, b) for i, (a, b) in zip(idx, r)]
        ids = ids_of(captions)
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((len(idx), x0.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, len(alphas), (cfg.unet_batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = te(ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=context).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t] if cfg.min_snr_gamma else torch.ones_like(snr[t])
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            recent = float(np.mean(losses[-100:]))
            log(f"unet step {step + 1}/{cfg.unet_steps} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.unet_steps:
            log(f"unet step {step + 1}: EMA weights judged {quick_eval(ema_unet, ema_te, vae, tok, cfg)}")
    for p_ema, p in zip(ema_unet.buffers(), unet.buffers()):
        p_ema.copy_(p)
    return ema_unet.eval(), ema_te.eval(), losses


def quick_eval(unet, te, vae, tok, cfg: BaseTrainConfig) -> dict:
    """Judged accuracy of one sample for every fourth training prompt and every probe (diffusers' Euler sampler,
    ``cfg.eval_steps`` steps, guidance ``cfg.eval_cfg``): a progress reading, not the shipped metric."""
    import torch
    from diffusers import EulerDiscreteScheduler

    specs = W.training_specs()[::4] + list(W.COMPOSITIONAL_PROBES)
    sched = EulerDiscreteScheduler.from_config(default_scheduler_config("sd1", "epsilon"))
    sched.set_timesteps(cfg.eval_steps)
    gen = torch.Generator().manual_seed(cfg.seed + 6)
    with torch.no_grad():
        cond = te(tok([s.caption() for s in specs], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids).last_hidden_state
        uncond = te(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
                    ).last_hidden_state.expand_as(cond)
        x = torch.randn((len(specs), 4, SIZE // 4, SIZE // 4), generator=gen) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            e_c, e_u = unet(inp, t, encoder_hidden_states=torch.cat([cond, uncond])).sample.chunk(2)
            x = sched.step(e_u + cfg.eval_cfg * (e_c - e_u), t, x).prev_sample
        images = ((vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    n = len(specs) - len(W.COMPOSITIONAL_PROBES)
    verdicts = load_judge()(images)
    attrs = ("shape", "color", "background")
    world, probes = accuracy(verdicts[:n], specs[:n], attrs), accuracy(verdicts[n:], specs[n:], attrs)
    return {**{k: round(v, 2) for k, v in world.items() if k != "n"}, "probes": round(probes["all"], 2)}


# ------------------------------------------------------------------------------------------------------- saving
def save_folder(out: Path, vae, unet, te, tokenizer_folder: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if Path(tokenizer_folder).resolve() != (out / "tokenizer").resolve():
        shutil.copytree(tokenizer_folder, out / "tokenizer", dirs_exist_ok=True)
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    te.save_pretrained(out / "text_encoder")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(default_scheduler_config("sd1", "epsilon"),
                                                                        indent=1))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=1))


# ------------------------------------------------------------------------------------------------------- evaluation
def sample_prompts(handle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, cfg: float = 5.0,
                   negative: str = ""):
    """Images ``[N, 64, 64, 3]`` for ``prompts[i]`` with ``seeds[i]`` through the pack's own sampler."""
    import torch

    out = []
    for prompt, seed in zip(prompts, seeds):
        s = SampleSettings(prompt=prompt, negative=negative, seed=int(seed), steps=steps, cfg=cfg, sampler="euler",
                           scheduler="normal", width=SIZE, height=SIZE, batch_size=1)
        out.append(sample(handle, s))
    return torch.cat(out)


def evaluate_base(handle, per_spec: int = 2, steps: int = 20, cfg: float = 5.0,
                  specs: Sequence[W.Spec] | None = None) -> dict:
    """Judge accuracy of samples of the world's prompts: per attribute and all at once."""

    specs = list(W.training_specs() if specs is None else specs)
    many = [s for s in specs for _ in range(per_spec)]
    seeds = [W.example_seed(s, i, "eval") % (2 ** 31) for s in specs for i in range(per_spec)]
    images = sample_prompts(handle, [s.caption() for s in many], seeds, steps=steps, cfg=cfg)
    acc = accuracy(load_judge()(images), many, ("shape", "color", "background"))
    return {k: round(v, 4) for k, v in acc.items()}


def _log(msg: str) -> None:
    print(f"[shapes-tiny] {msg}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfy_finetune.shapes.train_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).with_name(MODEL_NAME)), help="output diffusers folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixes float summation order)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply step counts (e.g. 0.05 for a smoke run)")
    p.add_argument("--eval-per-spec", type=int, default=None,
                   help="samples per prompt in the final judged evaluation (0: skip it)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between quick judged evaluations during UNet training (0: never; default 2000 x scale)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cfg = BaseTrainConfig(seed=args.seed)
    if args.scale != 1.0:
        cfg.vae_steps = max(2, int(cfg.vae_steps * args.scale))
        cfg.unet_steps = max(2, int(cfg.unet_steps * args.scale))
        cfg.warmup = max(1, int(cfg.warmup * args.scale))
        cfg.vae_small_steps = int(cfg.vae_small_steps * args.scale)
        cfg.text_pre_steps = max(1, int(cfg.text_pre_steps * args.scale))
        cfg.eval_every = int(cfg.eval_every * args.scale)
        if args.scale < 1.0:  # smoke runs: less data too
            cfg.vae_pool = max(cfg.vae_batch, int(cfg.vae_pool * args.scale))
            cfg.per_spec = max(1, int(cfg.per_spec * args.scale))
    if args.eval_per_spec is not None:
        cfg.eval_per_spec = args.eval_per_spec
    if args.eval_every is not None:
        cfg.eval_every = args.eval_every
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists: pass --force to replace it", file=sys.stderr)
        return 2
    metrics: dict = {}

    def build(tmp: Path) -> None:  # trains and writes the whole folder; atomic_write renames it into place
        write_tokenizer_folder(tmp / "tokenizer")
        vae, scale = train_vae(cfg, _log)
        t_vae = time.perf_counter() - t0
        _log(f"vae done in {t_vae:.0f} s, latent scaling factor {scale:.4f}")
        unet, te, losses = train_unet(cfg, vae, tmp / "tokenizer", _log)
        t_train = time.perf_counter() - t0
        save_folder(tmp, vae, unet, te, tmp / "tokenizer")

        metrics.update({"model": MODEL_NAME, "config": asdict(cfg), "threads": args.threads,
                        "torch": torch.__version__, "world": __import__(
                            "comfy_finetune.shapes.judge", fromlist=["world_fingerprint"]).world_fingerprint(),
                        "train_seconds": round(t_train, 1), "vae_seconds": round(t_vae, 1),
                        "final_loss": round(float(np.mean(losses[-100:])), 5)})
        if cfg.eval_per_spec > 0:
            handle = ModelHandle(load_diffusers_folder(tmp, torch.float32, torch.device("cpu"), label=MODEL_NAME))
            metrics["accuracy_training_prompts"] = evaluate_base(handle, cfg.eval_per_spec, cfg.eval_steps,
                                                                 cfg.eval_cfg)
            metrics["accuracy_compositional_probes"] = evaluate_base(handle, 4, cfg.eval_steps, cfg.eval_cfg,
                                                                     specs=W.COMPOSITIONAL_PROBES)
            _log(f"judged accuracy on the training prompts: {metrics['accuracy_training_prompts']}")
            _log(f"compositional probes: {metrics['accuracy_compositional_probes']}")
        metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))

    t0 = time.perf_counter()
    atomic_write(out, build, folder=True)
    _log(f"wrote {out} in {metrics['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
