"""The shipped shapes-tiny image prompt adapter: zero-shot personalization works out of the box.

Fast versions of the benchmark's zero-shot row (``benchmarks/personalization.py --only zeroshot``): one reference
image of a subject the base model never draws and the adapter never saw, no training, and "a shape on a <b>
background" draws that subject on that background, far above what the base does."""

from __future__ import annotations

import json

import pytest
import torch

from comfy_finetune.core.image_encoder import load_image_encoder
from comfy_finetune.core.image_prompt import check_adapter_fits, load_adapter
from comfy_finetune.core.sampling import SampleSettings, sample
from comfy_finetune.nodes import image_prompt as N
from comfy_finetune.shapes import personalization as P
from comfy_finetune.shapes import world as W
from comfy_finetune.shapes.train_ip_adapter import adapter_specs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return P.run_node(P.LoadBase, ckpt_name=P.SHAPES_NAME)[0]


def test_the_shipped_adapter_is_small_safetensors_and_fits_shapes_tiny(pipe):
    files = [N.BUILTIN_ADAPTER, N.BUILTIN_ENCODER / "model.safetensors", N.BUILTIN_ENCODER / "config.json"]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 5_000_000
    adapter = load_adapter(N.BUILTIN_ADAPTER)
    assert (adapter.kind, adapter.input, adapter.cross_dim) == ("linear", "image_embeds", 64)
    check_adapter_fits(adapter, pipe.base.unet)
    assert any(k.startswith("lora_unet_") for k in adapter.extra)  # the LoRA it was trained with ships inside
    encoder = load_image_encoder(N.BUILTIN_ENCODER)
    assert encoder.projection_dim == adapter.embed_dim and encoder.image_size == 64
    metrics = json.loads((N.BUILTIN_FOLDER / "metrics.json").read_text())
    assert metrics["adapter_seconds"] + metrics["encoder_seconds"] < 3600  # the budget: an hour on 2 cores


def test_the_benchmark_subjects_are_not_in_the_adapters_data():
    subjects = {(c.shape, c.color) for c in W.concepts("subject")}
    specs = adapter_specs()
    assert subjects and not any((s.shape, s.color) in subjects for s in specs)
    assert {s.shape for s in specs} == set(W.SHAPES)  # hearts and moons in other colours are


def test_one_reference_image_draws_a_subject_the_base_never_draws(pipe):
    heart = W.concepts("subject")[1]
    assert (heart.shape, heart.color) == ("heart", "red")
    budget = P.FAST
    base = P.generate(pipe, ["a shape on a blue background"], budget)
    assert P.share(base, lambda v: v.shape == "heart") == 0.0
    row = P.zero_shot_row(pipe, heart, budget)
    f = row.figures
    assert f["training_seconds"] == 0.0
    assert f["subject_fidelity"] >= 0.5, row
    assert f["prompt_fidelity"] >= 0.5, row


def test_strength_zero_is_the_plain_model_and_the_input_pipe_is_unchanged(pipe):
    ref = P.reference_image(W.concepts("subject")[0])
    s = SampleSettings(prompt="a shape on a gray background", seed=3, steps=4, cfg=5.0, width=64, height=64)
    plain = sample(pipe, s)
    off = P.run_node(N.ImagePrompt, pipe=pipe, image=ref, strength=0.0)[0]
    assert off is pipe
    on = P.run_node(N.ImagePrompt, pipe=pipe, image=ref, strength=1.0)[0]
    assert on is not pipe and pipe.patches == ()
    assert [type(p).__name__ for p in on.patches] == ["LoraPatch", "ImagePromptPatch"]
    assert not torch.equal(sample(on, s), plain)
    assert torch.equal(sample(pipe, s), plain)  # the processors came back
