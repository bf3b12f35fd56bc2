"""The host boundary headless: folders, confinement, progress and cancel."""

from __future__ import annotations

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError, Interrupted
from comfy_finetune.core.loading import load_base
from comfy_finetune.core.sampling import SampleSettings, sample
from comfy_finetune.nodes.generation import LoadBase


def test_not_in_comfyui_headless():
    assert host.in_comfyui() is False


def test_lists_models_by_comfyui_subfolder(models_dir):
    (models_dir / "loras" / "sub").mkdir(exist_ok=True)
    (models_dir / "loras" / "sub" / "x.safetensors").write_bytes(b"")
    (models_dir / "loras" / "notes.txt").write_text("not a model")
    assert "sub/x.safetensors" in host.list_files("loras")
    assert "notes.txt" not in host.list_files("loras")
    assert {"tiny-sd1", "tiny-sd2", "tiny-sdxl"} <= set(host.list_diffusers_folders())


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "sub/../../x", "", "..\\x"])
def test_names_never_escape_their_folder(models_dir, name):
    (models_dir / "secret.safetensors").write_bytes(b"")
    assert host.resolve_model("loras", name) is None


def test_symlink_out_of_folder_refused(models_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    link = models_dir / "loras" / "link.safetensors"
    if not link.exists():
        link.symlink_to(outside)
    assert host.resolve_model("loras", "link.safetensors") is None


def test_models_dir_from_environment(monkeypatch, tmp_path, models_dir):
    saved = host._settings.models_dir
    try:
        host._settings.models_dir = None
        monkeypatch.setenv("COMFY_FINETUNE_MODELS", str(tmp_path))
        assert host.models_dir() == tmp_path.resolve()
    finally:
        host._settings.models_dir = saved


def test_cancel_between_steps_restores_weights(tiny_handles):
    """Ctrl-C / cancel stops at the next step; LoRA merges are undone on the way out."""
    from comfy_finetune.core.handle import LoraPatch
    from comfy_finetune.core.lora import LoraModule, LoraWeights

    base = tiny_handles["sd1"]
    q = base.base.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    original_ptr, original = q.weight.data_ptr(), q.weight.detach().clone()
    lw = LoraWeights(base.family, {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"):
                                   LoraModule(torch.ones(2, 32), torch.ones(32, 2), alpha=2.0)}, {}, "ones")
    patched = base.with_patch(LoraPatch(lw))
    steps_seen = []

    def progress(i, n):
        steps_seen.append(i)
        if i == 1:
            host.request_interrupt()
        host.check_interrupt()

    with pytest.raises(Interrupted):
        sample(patched, SampleSettings("a red circle", steps=5, width=64, height=64), progress=progress)
    assert steps_seen == [1]
    assert q.weight.data_ptr() == original_ptr, "the original weight storage must be back after a cancel"
    assert torch.equal(q.weight, original)
    # and the next run works
    assert sample(base, SampleSettings("a red circle", steps=1, width=64, height=64)).shape == (1, 64, 64, 3)


def test_progress_checks_interrupt():
    with host.Progress(3) as bar:
        bar.update(1, loss=0.5)
        host.request_interrupt()
        with pytest.raises(Interrupted):
            bar.update(1)


def test_bf16_and_fp16_load_and_sample(models_dir):
    for dtype in ("bf16", "fp16"):
        h = load_base("diffusers/tiny-sd1", dtype, "cpu")
        expected = torch.bfloat16 if dtype == "bf16" else torch.float16
        assert next(h.base.unet.parameters()).dtype == expected
        img = sample(h, SampleSettings("a red circle", steps=2, width=64, height=64))
        assert img.dtype == torch.float32 and torch.isfinite(img).all()


def test_unavailable_device_is_a_clear_error(models_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(FinetuneError, match=r"^input 'device': CUDA was requested.*Fix"):  # the core names no node
        load_base("diffusers/tiny-sd1", "fp32", "cuda")
    with pytest.raises(FinetuneError, match=r"\[LoadBase\] input 'device': CUDA was requested.*Fix"):
        LoadBase().run("diffusers/tiny-sd1", "fp32", "cuda")


def test_hub_id_offline_is_a_clear_error(models_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FinetuneError, match=r"\[LoadBase\] input 'hub_id': could not fetch 'nobody/no-such-model'"):
        LoadBase().run("ignored", "fp32", "cpu", hub_id="nobody/no-such-model")


def test_listing_and_loading_agree_on_links_out_of_the_folder(models_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"")
    link = models_dir / "loras" / "linked-out.safetensors"
    if not link.exists():
        link.symlink_to(outside)
    assert "linked-out.safetensors" not in host.list_files("loras")
    assert host.resolve_model("loras", "linked-out.safetensors") is None


def test_broken_diffusers_folder_is_a_clear_error(models_dir):
    import shutil

    broken = models_dir / "diffusers" / "broken-sd1"
    if not broken.exists():
        shutil.copytree(models_dir / "diffusers" / "tiny-sd1", broken)
        (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(FinetuneError, match=r"\[LoadBase\] input 'ckpt_name': the 'unet' part of 'broken-sd1'.*Fix"):
        LoadBase().run("diffusers/broken-sd1", "fp32", "cpu")
