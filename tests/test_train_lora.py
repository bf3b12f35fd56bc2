"""TrainLoRA: it teaches, leaves the base alone, cancels into a resumable checkpoint, resumes exactly."""

from __future__ import annotations

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError, Interrupted
from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.diffusion import evaluation_loss
from comfy_finetune.training.lora_trainer import LoraSpec, train_lora
from comfy_finetune.training.settings import TrainSettings


@pytest.fixture(scope="module")
def dataset(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_the_loss_and_leaves_the_base_alone(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    unet_before, te_before = _state(h.base.unet), _state(h.base.text_encoders[0])
    modules_before = [n for n, _ in h.base.unet.named_modules()]
    before = evaluation_loss(h, dataset)
    lora, result = train_lora(h, dataset, TrainSettings(steps=60, learning_rate=2e-3, seed=0),
                              LoraSpec(rank=4, alpha=4, targets="attention+feedforward"))
    after = evaluation_loss(h.with_patch(LoraPatch(lora)), dataset)
    assert after < before - 0.01, (before, after)
    assert len(result.losses) == 60 and all(torch.isfinite(torch.tensor(result.losses)))
    assert _same(unet_before, _state(h.base.unet)) and _same(te_before, _state(h.base.text_encoders[0]))
    assert [n for n, _ in h.base.unet.named_modules()] == modules_before, "peft layers must be removed"
    assert evaluation_loss(h, dataset) == before
    assert {c for c, _ in lora.modules} == {"unet"}
    assert any(p.endswith("ff.net.2") for _, p in lora.modules)


def test_text_encoder_training_and_targets(tiny_handles, dataset):
    h = tiny_handles["sdxl"]
    lora, _ = train_lora(h, dataset, TrainSettings(steps=3, learning_rate=1e-3),
                         LoraSpec(rank=2, alpha=2, targets="attention", train_text_encoder=True))
    comps = {c for c, _ in lora.modules}
    assert comps == {"unet", "te1", "te2"}
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for c, p in lora.modules if c == "unet")
    # zero-initialised B means an untrained LoRA does nothing; after training B moved
    assert any(float(m.up.abs().sum()) > 0 for m in lora.modules.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_checkpointing_run(tiny_handles, dataset, precision):
    lora, result = train_lora(tiny_handles["sd2"], dataset,
                              TrainSettings(steps=2, learning_rate=1e-3, precision=precision,
                                            gradient_checkpointing=True, min_snr_gamma=5.0, noise_offset=0.05),
                              LoraSpec(rank=2, alpha=1, targets="attention+feedforward+conv"))
    assert len(result.losses) == 2
    assert all(m.down.dtype == torch.float32 for m in lora.modules.values())
    assert any("conv" in p for _, p in lora.modules)


def _interrupt_at(step):
    def sink(event, data):
        if event == "comfy_finetune.train" and data["step"] == step:
            host.request_interrupt()
    return sink


def test_cancel_keeps_a_resumable_checkpoint_and_resume_is_exact(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    spec = LoraSpec(rank=2, alpha=2)
    settings = TrainSettings(steps=6, learning_rate=1e-3, seed=11, lr_schedule="cosine", warmup_steps=1)
    full, _ = train_lora(h, dataset, settings, spec)  # uninterrupted reference (writes no checkpoint)
    folder = host.output_dir() / "finetune_checkpoints"
    earlier = set(folder.iterdir()) if folder.is_dir() else set()  # other tests' runs (e.g. save_every graphs)

    sink = _interrupt_at(3)
    host.add_event_sink(sink)
    try:
        with pytest.raises(Interrupted):
            train_lora(h, dataset, settings, spec)
    finally:
        host._settings.event_sinks.remove(sink)
    files = [f for f in folder.iterdir() if f not in earlier]
    assert [f for f in files if f.name.startswith(".")] == [], "no partial/temp file may remain"
    ckpt = [f for f in files if f.name.startswith("lora-")]
    assert len(ckpt) == 1
    state = torch.load(ckpt[0], weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3

    resumed, result = train_lora(h, dataset, TrainSettings(**{**settings.__dict__, "resume": True}), spec)
    assert result.resumed_from == 3 and result.steps_done == 6
    for key, mod in full.modules.items():
        assert torch.allclose(mod.down, resumed.modules[key].down, atol=1e-6)
        assert torch.allclose(mod.up, resumed.modules[key].up, atol=1e-6)
    ckpt[0].unlink()


@pytest.mark.parametrize("change,input_name", [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"batch_size": 50}, "batch_size"),
    ({"steps": 0}, "steps"),
])
def test_bad_settings_are_clear_errors(tiny_handles, dataset, change, input_name):
    settings = TrainSettings(**{"steps": 2, "learning_rate": 1e-3, **change})
    with pytest.raises(FinetuneError, match=rf"\[train_lora\] input '{input_name}'.*Fix:"):
        train_lora(tiny_handles["sd1"], dataset, settings, LoraSpec(rank=2))


def test_rank_larger_than_the_layer(tiny_handles, dataset):
    with pytest.raises(FinetuneError, match=r"input 'rank': rank 512 is larger than the layer.*at most 32"):
        train_lora(tiny_handles["sd1"], dataset, TrainSettings(steps=1), LoraSpec(rank=512))


def test_nan_loss_names_the_step(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    unet_before = _state(h.base.unet)
    with pytest.raises(FinetuneError, match=r"loss became (nan|inf) at step \d+.*learning_rate"):
        train_lora(h, dataset, TrainSettings(steps=30, learning_rate=1e8), LoraSpec(rank=4, alpha=64))
    assert _same(unet_before, _state(h.base.unet)), "a failed run must leave the base as it was"


def _hooks(handle):
    mods = [handle.base.unet, *handle.base.text_encoders]
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m.get_input_embeddings()._forward_hooks)
             if hasattr(m, "get_input_embeddings") else 0) for m in mods]


def test_checkpointing_leaves_no_hooks_behind(tiny_handles, dataset):
    """Gradient checkpointing on shared encoders must be undone completely (transformers adds an input hook)."""
    from comfy_finetune.training.ti_trainer import TISpec, train_embedding

    h = tiny_handles["sdxl"]
    before = _hooks(h)
    settings = TrainSettings(steps=1, learning_rate=1e-3, gradient_checkpointing=True)
    train_lora(h, dataset, settings, LoraSpec(rank=2, alpha=2, train_text_encoder=True))
    train_embedding(h, dataset, settings, TISpec(token="<hooktest>", initializer="circle"))
    assert _hooks(h) == before
    assert all(not m.gradient_checkpointing for m in [h.base.unet] if hasattr(m, "gradient_checkpointing"))


def test_bad_validation_settings_fail_before_training(tiny_handles, dataset):
    from comfy_finetune.training.frame import Validation

    calls = []
    sink = lambda event, data: calls.append(data["step"])  # noqa: E731
    host.add_event_sink(sink)
    try:
        with pytest.raises(FinetuneError, match=r"\[train_lora\] input 'validation_scheduler'.*karras"):
            train_lora(tiny_handles["sd1"], dataset, TrainSettings(steps=3, learning_rate=1e-3), LoraSpec(rank=2),
                       validation=Validation(prompt="a red circle", sampler="ddim", scheduler="karras", width=64,
                                             height=64, steps=2))
    finally:
        host._settings.event_sinks.remove(sink)
    assert calls == [], "no training step may run before the settings are checked"


def test_zero_text_learning_rate_with_text_training_refused(tiny_handles, dataset):
    with pytest.raises(FinetuneError, match=r"\[train_lora\] input 'text_learning_rate'.*Fix"):
        train_lora(tiny_handles["sd1"], dataset, TrainSettings(steps=1, learning_rate=1e-3),
                   LoraSpec(rank=2, train_text_encoder=True, text_learning_rate=0.0))
