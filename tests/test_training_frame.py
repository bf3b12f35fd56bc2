"""The training frame: every trainer honours every speed/memory option it offers, and leaves the shared base as
it found it.

The option table runs each trainer (LoRA, Textual Inversion, DreamBooth LoRA, DreamBooth full, pivotal tuning) with
each option (compile, channels_last, offload_frozen, cache_to_disk, gradient_checkpointing, fp8_base, offload_unet) on
the tiny SD 1.x model and checks the option's effect where it shows: the compiled module is the one called, the
memory format the denoiser's weights have while it runs, where the frozen VAE is during UNet steps, the cache hit on
a second run, the recomputation in the backward pass, the frozen layers' own forward. Every check only looks at
forward passes with autograd on, so the class images DreamBooth samples before training (no gradients) do not count.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo import register_backend

from comfy_finetune.training.data import from_image_batch
from comfy_finetune.training.dreambooth import DreamBoothSpec, train_dreambooth
from comfy_finetune.training.lora_trainer import LoraSpec, train_lora
from comfy_finetune.training.pivotal import PivotalSpec
from comfy_finetune.training.settings import TrainSettings
from comfy_finetune.training.ti_trainer import TISpec, train_embedding

TRAINERS = ("lora", "ti", "dreambooth-lora", "dreambooth-full", "dreambooth-pivotal")
STEPS = 2

_COMPILED = {"graphs": 0, "calls": 0}


@register_backend(name="ft_counting")
def _counting_backend(gm, example_inputs):  # noqa: ARG001 - the backend signature
    """A torch.compile backend that runs the captured graph eagerly and counts graphs and calls."""
    _COMPILED["graphs"] += 1

    def run(*args):
        _COMPILED["calls"] += 1
        return gm.forward(*args)

    return run


@pytest.fixture(scope="module")
def dataset(models_dir):
    g = torch.Generator().manual_seed(0)
    return from_image_batch(torch.rand((2, 64, 64, 3), generator=g), ["a red circle", "a blue square"],
                            resolution=64)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def train(kind: str, handle, dataset, **options):
    settings = TrainSettings(**{"steps": STEPS, "learning_rate": 1e-3, "batch_size": 1, "seed": 3,
                                "cache_to_disk": False, **options})
    if kind == "lora":
        return train_lora(handle, dataset, settings, LoraSpec(rank=2, alpha=2))
    if kind == "ti":
        return train_embedding(handle, dataset, settings, TISpec(token="<frame-test>", initializer="shape"))
    method = kind.split("-")[1]
    pivotal = PivotalSpec(token="<frame-sks>", initializer="shape") if method == "pivotal" else None
    spec = DreamBoothSpec(instance_prompt="a <frame-sks> shape" if pivotal else "a sks shape", class_prompt="a shape",
                          method="lora" if pivotal else method, num_class_images=2, class_sample_steps=2, rank=2,
                          alpha=2)
    return train_dreambooth(handle, dataset, settings, spec, pivotal=pivotal)


class _GradHook:
    """A forward pre-hook on a module (and on its deep copies: ``copy.deepcopy`` copies hooks, so it also sees
    full DreamBooth's trained UNet) that records ``probe(module)`` on passes with autograd on."""

    def __init__(self, module: torch.nn.Module, probe=lambda m: True) -> None:
        self.seen: list = []
        self.handle = module.register_forward_pre_hook(
            lambda m, args: self.seen.append(probe(m)) if torch.is_grad_enabled() else None)

    def __enter__(self) -> _GradHook:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("kind", TRAINERS)
def test_compile_runs_the_compiled_denoiser(tiny_handles, dataset, kind, monkeypatch, cache_dir, one_thread):
    monkeypatch.setenv("COMFY_FINETUNE_COMPILE_BACKEND", "ft_counting")
    torch._dynamo.reset()
    before = dict(_COMPILED)
    train(kind, tiny_handles["sd1"], dataset, compile=True)
    assert _COMPILED["graphs"] > before["graphs"], "the denoiser was never compiled"
    assert _COMPILED["calls"] - before["calls"] >= STEPS, "the compiled denoiser is not the one the loss calls"
    before = dict(_COMPILED)
    train(kind, tiny_handles["sd1"], dataset, compile=False)
    assert _COMPILED == before


@pytest.mark.parametrize("kind", TRAINERS)
def test_channels_last_is_the_denoisers_format_while_it_trains(tiny_handles, dataset, kind, cache_dir, one_thread):
    unet = tiny_handles["sd1"].base.unet
    probe = lambda m: m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()  # noqa: E731
    for on in (True, False):
        with _GradHook(unet.conv_in, probe) as hook:
            train(kind, tiny_handles["sd1"], dataset, channels_last="on" if on else "off")
        assert hook.seen and all(x == on for x in hook.seen), (on, hook.seen)
    assert unet.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("kind", TRAINERS)
def test_offload_keeps_the_frozen_vae_off_the_device_during_steps(tiny_handles, dataset, kind, offload_moves,
                                                                  cache_dir, one_thread):
    base = tiny_handles["sd1"].base

    def where(module):  # where the offload last moved it
        return next((d for m, d in reversed(offload_moves) if m is module), None)

    for on in (True, False):
        offload_moves.clear()
        with _GradHook(base.unet.conv_in, lambda m: where(base.vae)) as hook:
            train(kind, tiny_handles["sd1"], dataset, offload_frozen=on)
        assert hook.seen and all(x == ("cpu" if on else None) for x in hook.seen), (on, hook.seen)
        if on:
            assert where(base.vae) == str(base.device)  # back after the run


def test_offload_with_random_crops_keeps_only_the_vae_on_the_device(tiny_handles, offload_moves, cache_dir,
                                                                    one_thread):
    """Random crops are encoded every step, so the VAE stays; the cached text encoder goes once and comes back once
    (a VAE encode must not bring it back with it)."""
    base = tiny_handles["sd1"].base
    g = torch.Generator().manual_seed(1)
    cropped = from_image_batch(torch.rand((2, 80, 80, 3), generator=g), ["a red circle", "a blue square"],
                               resolution=64, crop="random")
    train("lora", tiny_handles["sd1"], cropped, offload_frozen=True)
    assert [d for m, d in offload_moves if m is base.text_encoders[0]] == ["cpu", str(base.device)]
    assert not [d for m, d in offload_moves if m is base.vae]


@pytest.mark.parametrize("kind", TRAINERS)
def test_fp8_base_and_offload_unet_wrap_the_frozen_denoiser_layers(tiny_handles, dataset, kind, cache_dir,
                                                                   one_thread):
    """fp8_base / offload_unet: the frozen UNet's layers run through training/fp8.py's layer function during steps
    (a forward of their own for the run), in every LoRA-type trainer; full DreamBooth trains its UNet, so its
    layers stay as they are; after the run no layer keeps the replacement."""
    unet = tiny_handles["sd1"].base.unet
    for options in ({"fp8_base": True}, {"offload_unet": "on"}):
        with _GradHook(unet.down_blocks[0].resnets[0].conv1, lambda m: "forward" in vars(m)) as hook:
            train(kind, tiny_handles["sd1"], dataset, **options)
        assert hook.seen and all(x == (kind != "dreambooth-full") for x in hook.seen), (options, hook.seen)
    assert not any("forward" in vars(m) for m in unet.modules())


@pytest.mark.parametrize("kind", TRAINERS)
def test_cache_to_disk_skips_the_vae_on_a_second_run(tiny_handles, dataset, kind, cache_dir, one_thread):
    vae = tiny_handles["sd1"].base.vae
    for on in (True, False):
        train(kind, tiny_handles["sd1"], dataset, cache_to_disk=on)  # fills the cache (and makes class images)
        encodes = []  # the VAE encodes without gradients: every call counts
        hook = vae.encoder.register_forward_pre_hook(lambda *_, seen=encodes: seen.append(1))
        try:
            train(kind, tiny_handles["sd1"], dataset, cache_to_disk=on)
        finally:
            hook.remove()
        assert (len(encodes) == 0) == on, (on, len(encodes))
    assert any((cache_dir / "latents").rglob("*.safetensors"))


@pytest.mark.parametrize("kind", TRAINERS)
def test_gradient_checkpointing_recomputes_in_the_backward_pass(tiny_handles, dataset, kind, cache_dir, one_thread):
    block = tiny_handles["sd1"].base.unet.up_blocks[-1].resnets[0]
    for on, per_step in ((True, 2), (False, 1)):
        with _GradHook(block) as hook:
            train(kind, tiny_handles["sd1"], dataset, gradient_checkpointing=on)
        # checkpointed blocks run their forward again in the backward pass (a pre-hook: the recompute stops early)
        assert len(hook.seen) == STEPS * per_step, (on, len(hook.seen))
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_handles["sd1"].base.unet.modules())


# ------------------------------------------------------------------------------------------------ the shared base
def _snapshot(base) -> dict:
    """Everything a run could leave changed on the shared modules: structure, modes, hooks, checkpointing flags,
    attention processors, and every parameter's identity, dtype, device, layout, flag and content."""
    out = {"tokenizers": [len(t) for t in base.tokenizers],
           "processors": {k: type(p).__name__ for k, p in base.unet.attn_processors.items()}}
    for i, m in enumerate((base.unet, base.vae, *base.text_encoders)):
        out[f"modules{i}"] = [(n, type(s).__name__, s.training, len(s._forward_hooks), len(s._forward_pre_hooks),
                               len(s._backward_hooks), getattr(s, "gradient_checkpointing", None))
                              for n, s in m.named_modules()]
        # not the storage address: channels-last (and an offload to another device) moves a weight's storage and
        # back; the Parameter object, its layout and every value must be the same
        out[f"params{i}"] = [(n, id(p), p.dtype, str(p.device), p.requires_grad, p.stride(),
                              float(p.detach().double().sum())) for n, p in m.named_parameters()]
        out[f"attrs{i}"] = sorted(k for k in vars(m) if not k.startswith("_"))
    return out


@pytest.mark.parametrize("kind", TRAINERS)
def test_every_trainer_leaves_the_shared_base_as_it_was(tiny_handles, dataset, kind, monkeypatch, cache_dir,
                                                        one_thread):
    from diffusers.models.attention_processor import AttnProcessor

    monkeypatch.setenv("COMFY_FINETUNE_COMPILE_BACKEND", "eager")
    base = tiny_handles["sd1"].base
    processors = base.unet.attn_processors
    base.unet.set_attn_processor(AttnProcessor())  # the frame switches to SDPA for the run, and must switch back
    try:
        before = _snapshot(base)
        train(kind, tiny_handles["sd1"], dataset, compile=True, channels_last="on", offload_frozen=True,
              cache_to_disk=True, gradient_checkpointing=True, fp8_base=True, offload_unet="on")
        after = _snapshot(base)
        assert after.keys() == before.keys()
        for key in before:
            if isinstance(before[key], list):
                changed = [(a, b) for a, b in zip(before[key], after[key]) if a != b]
                assert not changed and len(before[key]) == len(after[key]), (key, changed[:3])
            assert after[key] == before[key], key
    finally:
        base.unet.set_attn_processor(processors)


def test_the_base_model_is_read_only(tiny_handles):
    base = tiny_handles["sd1"].base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.unet = None
    assert isinstance(base.text_encoders, tuple) and isinstance(base.tokenizers, tuple)
