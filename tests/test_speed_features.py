"""Every speed and memory feature is actually in effect (README "Performance"), on the tiny models.

SDPA attention, latent/text caches on disk, gradient checkpointing, mixed precision with fp32 trainables, the
8-bit optimizer choice, torch.compile, channels-last, VAE tiling/slicing for big samples and the offload of
frozen parts. What each saves is measured by ``benchmarks/suite.py``, not here.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.training.data import from_image_batch
from comfy_finetune.training.frame import prepared
from comfy_finetune.training.loop import make_optimizer, step_generator
from comfy_finetune.training.lora_trainer import LoraObjective, LoraSpec, train_lora
from comfy_finetune.training.settings import TrainSettings
from comfy_finetune.training.speed import ensure_sdpa


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, size, size, 3), generator=g)


@pytest.fixture(scope="module")
def dataset(models_dir):
    return from_image_batch(_images(3), ["a red circle", "a blue square", "a green star"], resolution=64)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _settings(**kw) -> TrainSettings:
    return TrainSettings(**{"steps": 1, "learning_rate": 1e-3, "cache_to_disk": False, **kw})


def _one_loss(run, dataset, batch_size: int = 2) -> torch.Tensor:
    """One step's loss through the frame's prepared run (its denoiser bound)."""
    batch = next(dataset.batches(batch_size, 0))
    return run.loss(0, batch, step_generator(0, 0))


class _Counter:
    """Wraps a callable and counts calls (and the batch size of the first argument)."""

    def __init__(self, fn):
        self.fn, self.calls, self.batches = fn, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if args and isinstance(args[0], torch.Tensor):
            self.batches.append(args[0].shape[0])
        return self.fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ attention
def test_unet_attention_runs_through_sdpa(tiny_handles, dataset, monkeypatch, one_thread):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = tiny_handles["sd1"].base.unet
    assert unet.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    inside, calls = [False], [0]

    def counting(*args, **kwargs):
        calls[0] += inside[0]
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    hooks = [unet.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             unet.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    settings = _settings()
    objective = LoraObjective(tiny_handles["sd1"], dataset, settings, LoraSpec(rank=2, alpha=2), node="T")
    try:
        with prepared(objective, tiny_handles["sd1"], settings, node="T") as run:
            _one_loss(run, dataset)
    finally:
        for hk in hooks:
            hk.remove()
    assert calls[0] == len(unet.attn_processors)  # every attention layer of the UNet, once per forward


def test_ensure_sdpa_replaces_the_plain_processor(one_thread):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from comfy_finetune.core.tiny import unet_config

    unet = UNet2DConditionModel(**unet_config("sd1"))
    unet.set_attn_processor(AttnProcessor())
    assert ensure_sdpa(unet) == len(unet.attn_processors) > 0
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert ensure_sdpa(unet) == 0


# ------------------------------------------------------------------------------------------------ disk caches
@pytest.fixture
def spy_encoders(monkeypatch):
    """spy(handle) -> (VAE encode counter, [text-encoder forward calls]); hooks removed after the test."""
    hooks = []

    def spy(handle) -> tuple[_Counter, list[int]]:
        vae_counter = _Counter(handle.base.vae.encode)
        monkeypatch.setattr(handle.base.vae, "encode", vae_counter)
        te_calls = [0]

        def hook(*_):
            te_calls[0] += 1

        hooks.extend(te.register_forward_hook(hook) for te in handle.base.text_encoders)
        return vae_counter, te_calls

    yield spy
    for hk in hooks:
        hk.remove()


def test_second_run_reads_latents_and_captions_from_disk(tiny_handles, dataset, cache_dir, spy_encoders, one_thread):
    h = tiny_handles["sdxl"]
    vae, te = spy_encoders(h)
    spec = LoraSpec(rank=2, alpha=2, targets="attention")
    first, _ = train_lora(h, dataset, _settings(steps=3, batch_size=3, cache_to_disk=True), spec)
    assert vae.calls == 3 and te[0] == 3 * 2  # three images; three captions through two text encoders
    files = sorted(cache_dir.rglob("*.safetensors"))
    assert len(files) == 6 and not [p for p in cache_dir.rglob("*") if ".tmp" in p.name]
    from safetensors.torch import load_file

    assert {tuple(load_file(str(f))) for f in files} == {("latent",), ("cond", "pooled")}

    vae.calls, te[0] = 0, 0
    second, _ = train_lora(h, dataset, _settings(steps=3, batch_size=3, cache_to_disk=True), spec)
    assert vae.calls == 0 and te[0] == 0, "a re-run must not encode again"
    # same latents and conditioning, so the same training result
    for key, mod in first.modules.items():
        assert torch.allclose(mod.up, second.modules[key].up, atol=1e-6)

    # one image changed: only that one is encoded again; a new caption is one text encoding more
    images = _images(3)
    images[1] = 1.0 - images[1]
    changed = from_image_batch(images, ["a red circle", "a blue square", "a big green star"], resolution=64)
    vae.calls, te[0] = 0, 0
    train_lora(h, changed, _settings(steps=3, batch_size=3, cache_to_disk=True), spec)
    assert vae.calls == 1 and te[0] == 2

    # another resolution (a setting) misses every latent
    vae.calls = 0
    smaller = from_image_batch(_images(3), ["a red circle", "a blue square", "a green star"], resolution=32)
    train_lora(h, smaller, _settings(steps=1, batch_size=3, cache_to_disk=True), spec)
    assert vae.calls == 3

    # another model misses too (its own source, weights and text encoders)
    other = tiny_handles["sd1"]
    vae1, te1 = spy_encoders(other)
    train_lora(other, dataset, _settings(steps=1, batch_size=3, cache_to_disk=True), spec)
    assert vae1.calls == 3 and te1[0] == 3


def test_disk_cache_off_writes_nothing(tiny_handles, dataset, cache_dir, one_thread):
    train_lora(tiny_handles["sd1"], dataset, _settings(cache_to_disk=False), LoraSpec(rank=2, alpha=2))
    assert not list(cache_dir.rglob("*.safetensors"))


def test_a_damaged_cache_file_is_recomputed(tiny_handles, dataset, cache_dir, spy_encoders, one_thread):
    h = tiny_handles["sd1"]
    train_lora(h, dataset, _settings(steps=1, batch_size=3, cache_to_disk=True), LoraSpec(rank=2, alpha=2))
    latent_files = sorted((cache_dir / "latents").rglob("*.safetensors"))
    latent_files[0].write_bytes(b"not safetensors")
    vae, _ = spy_encoders(h)
    train_lora(h, dataset, _settings(steps=1, batch_size=3, cache_to_disk=True), LoraSpec(rank=2, alpha=2))
    assert vae.calls == 1
    from safetensors.torch import load_file

    assert "latent" in load_file(str(latent_files[0]))


# ------------------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_recomputes_the_unet_blocks(tiny_handles, dataset, on, one_thread):
    h = tiny_handles["sd1"]
    unet = h.base.unet
    settings = _settings(gradient_checkpointing=on)
    objective = LoraObjective(h, dataset, settings, LoraSpec(rank=2, alpha=2), node="T")
    calls = [0]
    hook = unet.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with prepared(objective, h, settings, node="T") as run:
            flags = [getattr(m, "gradient_checkpointing", False) for m in unet.modules()]
            assert any(flags) == on
            _one_loss(run, dataset).backward()
    finally:
        hook.remove()
    # checkpointed blocks run their forward again in the backward pass (a pre-hook: torch stops the recompute early)
    assert calls[0] == (2 if on else 1)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())


# ------------------------------------------------------------------------------------------------ precision
def test_bf16_autocast_with_fp32_trainables(models_dir, dataset, one_thread):
    from comfy_finetune.core.loading import load_base

    h = load_base("diffusers/tiny-sd1", "bf16", "cpu")
    seen = []

    def pre_hook(module, args, kwargs):
        lora = [p for n, p in module.named_parameters() if "lora_" in n]
        frozen = module.conv_in.weight
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     {p.dtype for p in lora}, frozen.dtype, all(p.requires_grad for p in lora)))

    handle = h.base.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        lora, result = train_lora(h, dataset, _settings(steps=2, precision="bf16"), LoraSpec(rank=2, alpha=2))
    finally:
        handle.remove()
    assert seen and all(s == (True, torch.bfloat16, {torch.float32}, torch.bfloat16, True) for s in seen)
    assert all(m.up.dtype == torch.float32 for m in lora.modules.values())
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_precision_auto_resolves_per_device(monkeypatch):
    s = TrainSettings()
    assert s.precision == "auto"
    assert s.resolved_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert s.resolved_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert s.resolved_precision(torch.device("cuda")) == "fp16"
    assert TrainSettings(precision="fp32").resolved_precision(torch.device("cuda")) == "fp32"


# ------------------------------------------------------------------------------------------------ 8-bit optimizer
def test_adamw8bit_is_chosen_when_bitsandbytes_is_installed(monkeypatch):
    class FakeAdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([{"params": [p]}], TrainSettings(optimizer="adamw8bit"), "TrainLoRA")
    assert type(opt) is FakeAdamW8bit
    assert type(make_optimizer([{"params": [p]}], TrainSettings(optimizer="adamw"), "T")) is torch.optim.AdamW


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(FinetuneError) as info:
        make_optimizer([{"params": [p]}], TrainSettings(optimizer="adamw8bit"), "TrainLoRA")
    assert info.value.input == "optimizer" and "bitsandbytes" in str(info.value) and "adamw" in info.value.fix


# ------------------------------------------------------------------------------------------------ compile
def test_compile_wraps_the_unet_and_matches_eager(tiny_handles, dataset, monkeypatch, one_thread):
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    # aot_eager traces exactly what inductor compiles (dynamo graph + autograd), without C++ code generation,
    # so the test stays fast; the suite benchmarks the default inductor backend.
    monkeypatch.setenv("COMFY_FINETUNE_COMPILE_BACKEND", "aot_eager")
    h = tiny_handles["sd1"]
    losses = {}
    for on in (False, True):
        settings = _settings(compile=on)
        objective = LoraObjective(h, dataset, settings, LoraSpec(rank=2, alpha=2), node="T")
        before = counters["stats"]["unique_graphs"]
        with prepared(objective, h, settings, node="T") as run:
            assert isinstance(run.denoiser, OptimizedModule) == on
            loss = _one_loss(run, dataset)
            loss.backward()
            grads = [p.grad.clone() for _, p in objective.named_trainables()]
        assert (counters["stats"]["unique_graphs"] > before) == on
        losses[on] = (float(loss), grads)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4, abs=1e-6)
    for a, b in zip(losses[True][1], losses[False][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------ channels-last
def test_channels_last_unet_during_training_only(tiny_handles, dataset, one_thread):
    h = tiny_handles["sd1"]
    unet = h.base.unet
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = []
    hook = unet.conv_in.register_forward_pre_hook(
        lambda m, args: seen.append((m.weight.is_contiguous(memory_format=torch.channels_last),
                                     args[0].is_contiguous(memory_format=torch.channels_last))))
    try:
        train_lora(h, dataset, _settings(steps=2, channels_last="on"), LoraSpec(rank=2, alpha=2))
        assert seen and all(w and x for w, x in seen)
        settings = _settings(channels_last="on")
        objective = LoraObjective(h, dataset, settings, LoraSpec(rank=2, alpha=2), node="T")
        with prepared(objective, h, settings, node="T"):
            assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert all(w.is_contiguous() for w in convs)  # the shared base is put back
        assert not TrainSettings(channels_last="auto").use_channels_last(torch.device("cpu"))
        assert TrainSettings(channels_last="auto").use_channels_last(torch.device("cuda"))
        with pytest.raises(FinetuneError) as info:
            TrainSettings(channels_last="maybe").validate("TrainLoRA")
        assert info.value.input == "channels_last"
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------------ VAE decode
def test_vae_tiles_large_images_and_slices_batches(tiny_handles, monkeypatch, one_thread):
    from comfy_finetune.core import sampling

    h = tiny_handles["sd1"]
    vae = h.base.vae
    native = vae.config.sample_size
    assert not sampling.vae_tiling_needed(vae, native, native)
    assert sampling.vae_tiling_needed(vae, native, sampling.TILE_ABOVE * native + 8)
    side = 3 * native  # 192 px on the tiny VAE: above the threshold
    latents = torch.randn((2, 4, side // 8, side // 8), generator=torch.Generator().manual_seed(0)) * 0.5
    tiled_counter = _Counter(vae.tiled_decode)
    decode_counter = _Counter(vae.decode)
    monkeypatch.setattr(vae, "tiled_decode", tiled_counter)
    monkeypatch.setattr(vae, "decode", decode_counter)
    images = sampling.decode(h, latents)
    assert tiled_counter.calls == 2 and decode_counter.batches == [1, 1]  # tiled, one image at a time
    assert not vae.use_tiling  # the shared VAE's flag is put back
    with torch.no_grad():
        plain = (vae.decode.fn(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    plain = plain.permute(0, 2, 3, 1)
    assert images.shape == plain.shape == (2, side, side, 3)
    # Blended tiles follow the untiled decode; they cannot match it exactly, because every tile normalises with its
    # own GroupNorm statistics, which on this random tiny VAE (a norm in every block, 8-latent tiles) differ much
    # more than on trained VAEs. An unrelated image would correlate ~0.
    corr = float(torch.corrcoef(torch.stack([images.flatten(), plain.flatten()]))[0, 1])
    assert corr > 0.7, corr
    tiled_counter.calls = 0
    sampling.decode(h, latents[:, :, :8, :8])
    assert tiled_counter.calls == 0  # small images are decoded whole
    # untiled batches decode in slices of at most DECODE_PIXELS pixels: five 64 px images at once by default, two a
    # slice when the budget is two such images; the slices give the images decoding them one by one gives
    small = torch.randn((5, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    decode_counter.batches.clear()
    together = sampling.decode(h, small)
    assert decode_counter.batches == [5]
    monkeypatch.setattr(sampling, "DECODE_PIXELS", 2 * 64 * 64)
    decode_counter.batches.clear()
    assert torch.allclose(sampling.decode(h, small), together, atol=1e-5)
    assert decode_counter.batches == [2, 2, 1]


# ------------------------------------------------------------------------------------------------ offload
def test_offload_keeps_frozen_parts_off_the_device_during_unet_steps(tiny_handles, dataset, offload_moves,
                                                                     spy_encoders, one_thread):
    h = tiny_handles["sd1"]
    base = h.base

    def where(module):  # where the offload last moved it
        return next((d for m, d in reversed(offload_moves) if m is module), None)

    vae, te = spy_encoders(h)
    during = []
    hook = base.unet.register_forward_pre_hook(
        lambda *_: during.append((where(base.vae), where(base.text_encoders[0]), vae.calls)))
    try:
        train_lora(h, dataset, _settings(steps=3, batch_size=1, offload_frozen=True), LoraSpec(rank=2, alpha=2))
    finally:
        hook.remove()
    # every latent and caption was encoded before the first UNet step, then VAE and text encoder went to the CPU
    assert during and all(d == ("cpu", "cpu", 3) for d in during)
    assert te[0] == 3
    assert where(base.vae) == str(base.device)  # back where they were after the run


# ------------------------------------------------------------------------------------------------ real-size configs
def test_shipped_configs_build_the_real_architectures():
    """Counted on the meta device (no memory): the published parameter counts of SD 1.5 and SDXL."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from comfy_finetune.core.realsize import load_configs

    def clean(cfg):
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                if not k.startswith("_") and k not in ("architectures", "model_type")}

    def count(model):
        return sum(p.numel() for p in model.parameters())

    expected = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
                "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                         "text_encoder_2": 694_659_840}}
    for name, parts in expected.items():
        configs = load_configs(name)
        assert set(configs) == set(parts)
        with torch.device("meta"):
            built = {"unet": UNet2DConditionModel(**clean(configs["unet"])),
                     "vae": AutoencoderKL(**clean(configs["vae"])),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**clean(configs["text_encoder"])))}
            if "text_encoder_2" in configs:
                built["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**clean(
                    configs["text_encoder_2"])))
        assert {k: count(m) for k, m in built.items()} == parts
    with pytest.raises(ValueError):
        load_configs("sd3")


def test_realsize_builder_allocates_in_the_target_dtype(models_dir, one_thread):
    from comfy_finetune.core.realsize import build_base, parameter_counts

    h = build_base("small", "bf16", "cpu")
    base = h.base
    assert base.family.value == "sd1" and base.dtype == torch.bfloat16
    assert {p.dtype for m in (base.unet, base.vae, *base.text_encoders) for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in base.unet.parameters())
    assert parameter_counts(h)["unet"] == sum(p.numel() for p in base.unet.parameters()) > 30_000_000
    # it is a working model: the pack's own sampling runs on it
    from comfy_finetune.core.sampling import SampleSettings, sample

    image = sample(h, SampleSettings(prompt="a red circle", steps=1, width=64, height=64, cfg=1.0))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
