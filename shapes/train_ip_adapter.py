"""Train the image prompt adapter that ships for ``shapes-tiny``: a small image encoder and an IP-Adapter.

    python -m comfy_finetune.shapes.train_ip_adapter [--out DIR] [--steps N] [--threads 2]

Two stages, seeded, under an hour on 2 CPU cores (``metrics.json`` records each stage's seconds):

1. **Image encoder**: a small CNN (``core.image_encoder.shapes_cnn``; a 3-layer, 64-wide CLIP ViT reached only 45 %
   shape accuracy after 1000 steps here, too slow for the budget) learns to tell shape, colour and fill from its
   projected ``image_embeds`` (three linear heads, thrown away afterwards), on renders with every background: the
   embedding carries the subject and not the background.
2. **Adapter**: the published IP-Adapter architecture (linear image tokens + a key/value pair per cross-attention
   layer, keys and values started from the UNet's own) plus a rank-8 LoRA on the UNet shipped in the same file (as
   IP-Adapter FaceID ships one: the frozen base has never drawn a heart or a moon, and without it the adapter
   carried colour and background within 300 steps but drew hearts as crosses and circles after 2000), trained with
   the text encoder and image encoder frozen. Each example pairs a target render with a *different* render of the
   same subject on another background, captioned only "a shape on a <b> background": the image says what, the
   words say where. Text and image are each dropped 5 % of the time (classifier-free guidance); three quarters of
   the examples are at timesteps 500 and up, where the outline is decided.

What it learns from: every shape, colour and fill of the world except the three benchmark subjects (green star,
red heart, yellow moon; :func:`comfy_finetune.shapes.world.concepts` ``"subject"``), on every background. So hearts
and moons are in its data in other colours (as a real adapter's web-scale data holds most kinds of things), but
the subjects the benchmark asks for are never: drawing them is zero-shot.

The output folder holds ``image_encoder/`` (``config.json`` + ``model.safetensors``, as h94's folder) and
``ip-adapter_shapes-tiny.safetensors`` (``image_proj.*`` + ``ip_adapter.<n>.*``, h94's layout, and the LoRA's
``lora_unet_*`` keys in the kohya layout), ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from comfy_finetune.core.atomic import atomic_write
from comfy_finetune.core.families import Family, default_scheduler_config
from comfy_finetune.core.handle import ModelHandle
from comfy_finetune.core.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    SHAPES_CNN,
    ImageEncoder,
    load_image_encoder,
    shapes_cnn,
)
from comfy_finetune.core.image_prompt import (
    ImageAdapter,
    ImagePromptAttention,
    ImagePromptPatch,
    build_projection,
    cross_attention_layers,
    ip_state_dict,
    project,
)
from comfy_finetune.core.loading import SHAPES_FOLDER, load_diffusers_folder
from comfy_finetune.core.lora import LoraWeights, to_kohya_state_dict
from comfy_finetune.shapes import world as W
from comfy_finetune.shapes.judge import load_judge
from comfy_finetune.shapes.train_base import sample_prompts
from comfy_finetune.training.lora_trainer import ADAPTER, _lora_layers, extract_module, remove_lora_layers
from comfy_finetune.training.settings import UNET_TARGETS

OUT = Path(__file__).resolve().parent / "ip-adapter"
ADAPTER_FILE = "ip-adapter_shapes-tiny.safetensors"
ENCODER_FOLDER = "image_encoder"
SIZE = 64
PROMPT = "a shape"


@dataclass
class Config:
    seed: int = 0
    per_spec: int = 8               # renders per (shape, colour, background, fill)
    enc_steps: int = 1500
    enc_batch: int = 64
    enc_lr: float = 2e-3
    enc_channels: tuple[int, ...] = (16, 32, 64, 96)
    enc_hidden: int = 128
    enc_embed: int = 64             # image_embeds width
    tokens: int = 4
    lora_rank: int = 8              # a LoRA on the UNet trained with the adapter and shipped in its file (0: none)
    steps: int = 3000
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    drop_text: float = 0.05
    drop_image: float = 0.05
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.3       # as the base was trained (see train_base.train_unet)
    high_noise_share: float = 0.75  # share of examples at timesteps >= high_noise_from, where the outline is decided
    high_noise_from: int = 500
    solid_share: float = 0.6        # share of solid renders among the examples (the others striped / dotted)
    eval_every: int = 1000
    eval_samples: int = 4
    eval_steps: int = 12


def subject_pairs() -> set[tuple[str, str]]:
    return {(c.shape, c.color) for c in W.concepts("subject")}


def adapter_specs() -> list[W.Spec]:
    """Every spec but the benchmark subjects'."""
    subjects = subject_pairs()
    return [s for s in W.all_specs() if (s.shape, s.color) not in subjects]


def encoder_config(cfg: Config) -> dict:
    return {"model_type": SHAPES_CNN, "image_size": SIZE, "channels": list(cfg.enc_channels),
            "hidden_size": cfg.enc_hidden, "projection_dim": cfg.enc_embed}


def _normalise(pixels):

    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def render_pool(cfg: Config, log):
    """``(specs, pixels [N, 3, 64, 64] in 0..1)`` for every adapter spec, ``per_spec`` renders each."""
    specs = adapter_specs()
    items = [(s, W.example_seed(s, i, "ip-adapter")) for s in specs for i in range(cfg.per_spec)]
    t0 = time.perf_counter()
    arr = W.render_batch([s for s, _ in items], [seed for _, seed in items])
    log(f"rendered {len(items)} images of {len(specs)} specs ({time.perf_counter() - t0:.0f} s)")
    pixels = torch.from_numpy(arr).float().permute(0, 3, 1, 2) / (255.0 if arr.dtype == np.uint8 else 1.0)
    return [s for s, _ in items], pixels


def train_encoder(cfg: Config, specs, pixels, log):
    """Stage 1: the image encoder, by classifying shape, colour and fill from ``image_embeds``."""
    torch.manual_seed(cfg.seed + 11)
    model = shapes_cnn(encoder_config(cfg))
    labels = torch.tensor([[W.SHAPES.index(s.shape), W.COLORS.index(s.color), W.FILLS.index(s.fill)] for s in specs])
    heads = torch.nn.ModuleList([torch.nn.Linear(cfg.enc_embed, n) for n in (len(W.SHAPES), len(W.COLORS),
                                                                              len(W.FILLS))])
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.enc_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.enc_steps) / cfg.enc_steps)))
    rng = np.random.default_rng([cfg.seed, 11])
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.enc_steps):
        idx = torch.from_numpy(rng.integers(0, len(specs), cfg.enc_batch))
        x = pixels[idx]
        if rng.random() < 0.5:  # a mirrored shape is the same shape (hearts and moons included)
            x = x.flip(-1)
        emb = model(pixel_values=_normalise(x)).image_embeds
        loss = sum(F.cross_entropy(h(emb), labels[idx, k]) for k, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.enc_steps - 1:
            with torch.no_grad():
                hits = [float((h(emb).argmax(-1) == labels[idx, k]).float().mean()) for k, h in enumerate(heads)]
            log(f"encoder batch accuracy shape/colour/fill {hits[0]:.2f}/{hits[1]:.2f}/{hits[2]:.2f}")
            log(f"encoder step {step + 1}/{cfg.enc_steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval().requires_grad_(False)
    # how well the embedding tells the benchmark subjects apart (never seen together in training)
    probe = [W.Spec(c.shape, c.color, b) for c in W.concepts("subject") for b in W.BACKGROUNDS
             if (c.color, b) not in W.FORBIDDEN]
    arr = W.render_batch(probe, [W.example_seed(s, 0, "ip-probe") for s in probe])
    x = torch.from_numpy(arr).float().permute(0, 3, 1, 2) / (255.0 if arr.dtype == np.uint8 else 1.0)
    with torch.no_grad():
        emb = model(pixel_values=_normalise(x)).image_embeds
        ok_shape = (heads[0](emb).argmax(-1) == torch.tensor([W.SHAPES.index(s.shape) for s in probe])).float().mean()
        ok_color = (heads[1](emb).argmax(-1) == torch.tensor([W.COLORS.index(s.color) for s in probe])).float().mean()
    acc = {"subject_shape": round(float(ok_shape), 4), "subject_color": round(float(ok_color), 4)}
    log(f"encoder on the held-out subjects: {acc}")
    return model, acc


#: The UNet layers the adapter's LoRA wraps: the recipe's attention + feed-forward + conv set without ``to_out.0``
#: (the image term is added through the cross-attention's ``to_out`` weight, which must be the same in training,
#: where peft keeps the delta apart, and at sampling, where the handle merges it).
LORA_TARGETS = tuple(t for t in UNET_TARGETS["attention+feedforward+conv"] if t != "to_out.0")


def _adapter(proj, keys, values, cfg: Config, unet=None) -> ImageAdapter:
    """The trained parts as an :class:`ImageAdapter` (with the LoRA in the kohya layout under ``extra``)."""
    proj_state = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    layers = tuple((k.detach().clone(), v.detach().clone()) for k, v in zip(keys, values))
    extra, meta = {}, {"ft_image_input": "image_embeds", "ft_base": "shapes-tiny"}
    if unet is not None and cfg.lora_rank:
        modules = {("unet", path): extract_module(layer, float(cfg.lora_rank), cfg.lora_rank)
                   for path, layer in _lora_layers(unet)}
        lora = LoraWeights(Family.SD1, modules, {}, "ip-adapter_shapes-tiny")
        extra, lora_meta = to_kohya_state_dict(lora, family=Family.SD1, unet_config=dict(unet.config))
        meta.update({k: v for k, v in lora_meta.items() if k.startswith("ss_network")})
        meta["ft_lora"] = "unet"
    return ImageAdapter("ip-adapter_shapes-tiny", "linear", "image_embeds", cfg.enc_embed,
                        int(layers[0][0].shape[1]), cfg.tokens, proj_state, layers, extra, metadata=meta)


def train_adapter(cfg: Config, handle, encoder, specs, pixels, log, evaluate=None):
    """Stage 2: the projection and the per-layer keys and values, everything else frozen."""
    base = handle.base
    unet, te, vae = base.unet, base.text_encoders[0], base.vae
    tok = base.tokenizers[0]
    for m in (unet, te, vae):
        m.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256] * 2 - 1).latent_dist.mean
                             for i in range(0, len(pixels), 256)]) * vae.config.scaling_factor
        embeds = torch.cat([encoder(pixel_values=_normalise(pixels[i:i + 512])).image_embeds
                            for i in range(0, len(pixels), 512)])
        embeds_flip = torch.cat([encoder(pixel_values=_normalise(pixels[i:i + 512].flip(-1))).image_embeds
                                 for i in range(0, len(pixels), 512)])
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((s.shape, s.color, s.fill), []).append(i)
    partners = [np.array([j for j in groups[(s.shape, s.color, s.fill)] if specs[j].background != s.background])
                for s in specs]
    solid = np.array([s.fill == "solid" for s in specs])
    weights = np.where(solid, cfg.solid_share / solid.sum(), (1 - cfg.solid_share) / (~solid).sum())

    torch.manual_seed(cfg.seed + 21)
    cross = int(unet.config.cross_attention_dim)
    proj = build_projection(ImageAdapter("new", "linear", "image_embeds", cfg.enc_embed, cross, cfg.tokens, {}, ()),
                            load=False).train()
    layers = cross_attention_layers(unet)
    keys = [torch.nn.Parameter(a.to_k.weight.detach().clone()) for a in layers]
    values = [torch.nn.Parameter(a.to_v.weight.detach().clone()) for a in layers]
    lora_params = []
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed + 23)
        config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=list(LORA_TARGETS))
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
        lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p_ in lora_params:
            p_.requires_grad_(True)
    params = list(proj.parameters()) + keys + values + lora_params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    sc = default_scheduler_config("sd1", "epsilon")
    ddpm = DDPMScheduler(num_train_timesteps=sc["num_train_timesteps"], beta_start=sc["beta_start"],
                         beta_end=sc["beta_end"], beta_schedule=sc["beta_schedule"])
    alphas = ddpm.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    captions = {b: f"a shape on {'an' if b[0] in 'aeiou' else 'a'} {b} background" for b in W.BACKGROUNDS}
    with torch.no_grad():
        ctx = {b: te(tok(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                     ).last_hidden_state[0] for b, c in captions.items()}
        ctx[""] = te(tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids).last_hidden_state[0]
    originals = [a.processor for a in layers]
    rng = np.random.default_rng([cfg.seed, 21])
    gen = torch.Generator().manual_seed(cfg.seed + 22)
    losses: list[float] = []
    history = []
    t0 = time.perf_counter()
    try:
        for a, k, v in zip(layers, keys, values):
            a.processor = ImagePromptAttention(a.processor, [(k, v, 1.0, cfg.tokens)])
        for step in range(cfg.steps):
            idx = rng.choice(len(specs), cfg.batch, p=weights)
            ref = np.array([rng.choice(partners[i]) for i in idx])
            flip = torch.from_numpy(rng.random(cfg.batch) < 0.5)
            emb = torch.where(flip[:, None], embeds_flip[torch.from_numpy(ref)], embeds[torch.from_numpy(ref)])
            drop_i = torch.from_numpy(rng.random(cfg.batch) < cfg.drop_image)
            emb = torch.where(drop_i[:, None], torch.zeros_like(emb), emb)
            drop_t = rng.random(cfg.batch) < cfg.drop_text
            text = torch.stack([ctx[""] if d else ctx[specs[i].background] for i, d in zip(idx, drop_t)])
            context = torch.cat([text, proj(emb)], dim=1)
            x0 = latents[torch.from_numpy(idx)]
            noise = torch.randn(x0.shape, generator=gen)
            noise = noise + cfg.noise_offset * torch.randn((len(idx), x0.shape[1], 1, 1), generator=gen)
            t = torch.randint(0, len(alphas), (cfg.batch,), generator=gen)
            high = torch.rand(cfg.batch, generator=gen) < cfg.high_noise_share
            t = torch.where(high, cfg.high_noise_from + t % (len(alphas) - cfg.high_noise_from), t)
            a_t = alphas[t].view(-1, 1, 1, 1)
            xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
            pred = unet(xt, t, encoder_hidden_states=context).sample
            weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == cfg.steps - 1:
                log(f"adapter step {step + 1}/{cfg.steps} loss {np.mean(losses[-100:]):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                for a, orig in zip(layers, originals):
                    a.processor = orig
                # peft's LoRA layers stay in place: sampling through them is the merged LoRA the node applies
                result = evaluate(_adapter(proj, keys, values, cfg))
                history.append({"step": step + 1, **result})
                log(f"adapter step {step + 1}: {result}")
                for a, k, v in zip(layers, keys, values):
                    a.processor = ImagePromptAttention(a.processor, [(k, v, 1.0, cfg.tokens)])
        adapter = _adapter(proj, keys, values, cfg, unet)
    finally:
        for a, orig in zip(layers, originals):
            a.processor = orig
        remove_lora_layers(unet)
    return adapter, losses, history, time.perf_counter() - t0


def reference_image(shape: str, color: str, background: str = "white", index: int = 0):
    """A rendered reference ``[1, 64, 64, 3]`` (ComfyUI IMAGE) of a subject."""
    spec = W.Spec(shape, color, background)
    arr = W.render_batch([spec], [W.example_seed(spec, index, "reference")])
    x = torch.from_numpy(arr).float()
    return x / 255.0 if arr.dtype == np.uint8 else x


def zero_shot(handle, adapter: ImageAdapter, encoder: ImageEncoder, image, strength: float = 1.0):
    """``handle`` with ``adapter`` on ``image`` (what the Apply Image Prompt node does for a linear adapter)."""
    embeds, _ = encoder.encode(image)
    cond = project(adapter, embeds.mean(0, keepdim=True))
    uncond = project(adapter, torch.zeros_like(embeds[:1]))
    return handle.with_patch(ImagePromptPatch(adapter, cond, uncond, strength))


def quick_eval(handle, adapter: ImageAdapter, encoder: ImageEncoder, samples: int, steps: int) -> dict:
    """Subject and prompt fidelity on the three benchmark subjects (the judge)."""
    judge = load_judge()
    subject_ok, prompt_ok, n_s, n_p = 0, 0, 0, 0
    for c in W.concepts("subject"):
        h = zero_shot(handle, adapter, encoder, reference_image(c.shape, c.color))
        prompts = [PROMPT] * samples
        bgs = [b for b in W.BACKGROUNDS if (c.color, b) not in W.FORBIDDEN]
        prompts += [f"a shape on {'an' if b[0] in 'aeiou' else 'a'} {b} background" for b in bgs for _ in range(2)]
        want_bg = [None] * samples + [b for b in bgs for _ in range(2)]
        imgs = sample_prompts(h, prompts, [1000 + i for i in range(len(prompts))], steps=steps, cfg=5.0)
        for v, b in zip(judge(imgs), want_bg):
            ok = v.shape == c.shape and v.color == c.color
            if b is None:
                subject_ok += ok
                n_s += 1
            else:
                prompt_ok += ok and v.background == b
                n_p += 1
    return {"subject_fidelity": round(subject_ok / n_s, 3), "prompt_fidelity": round(prompt_ok / n_p, 3)}


def save(out: Path, encoder, adapter: ImageAdapter, cfg: Config, metrics: dict) -> None:

    out.mkdir(parents=True, exist_ok=True)
    save_encoder(out / ENCODER_FOLDER, encoder, cfg)
    ip = {k: v.contiguous() for k, v in {**ip_state_dict(adapter), **adapter.extra}.items()}  # extra: the LoRA
    atomic_write(out / ADAPTER_FILE, lambda tmp: save_file(ip, str(tmp), metadata=dict(adapter.metadata)))
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=1)))


def save_encoder(folder: Path, encoder, cfg: Config) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    config = encoder_config(cfg)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=1)))
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))


def main(argv: Sequence[str] | None = None) -> int:


    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--steps", type=int, default=None, help=f"adapter steps (default {Config.steps})")
    p.add_argument("--enc-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--encoder", help="a trained image_encoder folder to use instead of training stage 1")
    p.add_argument("--encoder-only", action="store_true", help="stop after stage 1 (writes <out>/image_encoder)")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config()
    for name in ("steps", "enc_steps", "eval_every", "batch"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    specs, pixels = render_pool(cfg, log)
    if args.encoder:  # stage 1 from an earlier --encoder-only run
        enc = load_image_encoder(args.encoder)
        stage1 = json.loads((Path(args.encoder) / "accuracy.json").read_text())
        encoder, enc_acc, enc_seconds = enc.model, stage1["accuracy"], stage1["seconds"]
    else:
        t1 = time.perf_counter()
        encoder, enc_acc = train_encoder(cfg, specs, pixels, log)
        enc_seconds = round(time.perf_counter() - t1, 1)
        enc = ImageEncoder("shapes-tiny image encoder", encoder, SIZE)
    if args.encoder_only:
        save_encoder(Path(args.out) / ENCODER_FOLDER, encoder, cfg)
        atomic_write(Path(args.out) / ENCODER_FOLDER / "accuracy.json",
                     lambda tmp: tmp.write_text(json.dumps({"accuracy": enc_acc, "seconds": enc_seconds})))
        return 0
    base = load_diffusers_folder(SHAPES_FOLDER, torch.float32, torch.device("cpu"), label="shapes-tiny")
    handle = ModelHandle(base)
    evaluate = lambda a: quick_eval(handle, a, enc, cfg.eval_samples, cfg.eval_steps)  # noqa: E731
    adapter, losses, history, seconds = train_adapter(cfg, handle, encoder, specs, pixels, log, evaluate)
    metrics = {"config": asdict(cfg), "encoder_accuracy": enc_acc, "encoder_seconds": enc_seconds,
               "adapter_seconds": round(seconds, 1),
               "final_loss": round(float(np.mean(losses[-200:])), 5), "history": history,
               "total_seconds": round(time.perf_counter() - t0, 1), "threads": args.threads,
               "torch": torch.__version__}
    save(Path(args.out), encoder, adapter, cfg, metrics)
    log(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
