"""DreamBooth: prior-preservation loss, class-image cache, LoRA and full methods, base-prediction prior, node."""

from __future__ import annotations

import inspect

import pytest
import torch

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.core.lora import LoraModule, LoraWeights
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.training import dreambooth as db
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.diffusion import evaluation_loss
from comfy_finetune.training.frame import prepared
from comfy_finetune.training.loop import step_generator
from comfy_finetune.training.settings import TrainSettings

INSTANCE = "a photo of sks circle"
CLASS = "a photo of a circle"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def red(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


@pytest.fixture(scope="module")
def striped(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] striped-style")), resolution=64)


@pytest.fixture
def count_samples(monkeypatch):
    """Counts calls of the sampling path the class images are generated through."""
    calls = []
    real = db.sample

    def counting(handle, settings, **kwargs):
        calls.append(settings.seed)
        return real(handle, settings, **kwargs)

    monkeypatch.setattr(db, "sample", counting)
    return calls


def spec(**kw) -> db.DreamBoothSpec:
    base = dict(instance_prompt=INSTANCE, class_prompt=CLASS, num_class_images=3, class_sample_steps=2, rank=4,
                alpha=4.0)
    base.update(kw)
    return db.DreamBoothSpec(**base)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- pure parts
def test_prior_preservation_loss_value():
    instance = torch.tensor([1.0, 3.0])  # mean 2
    prior = torch.tensor([2.0, 4.0, 6.0])  # mean 4
    assert float(db.prior_preservation_loss(instance, prior, 0.5)) == pytest.approx(4.0)
    assert float(db.prior_preservation_loss(instance, prior, 1.0)) == pytest.approx(6.0)
    assert float(db.prior_preservation_loss(instance, prior, 0.0)) == pytest.approx(2.0)
    a = torch.tensor([1.0, 3.0], requires_grad=True)
    b = torch.tensor([2.0, 4.0], requires_grad=True)
    db.prior_preservation_loss(a, b, 2.0).backward()
    assert torch.allclose(a.grad, torch.full((2,), 0.5)) and torch.allclose(b.grad, torch.full((2,), 1.0))


def test_instance_captions_replaced_and_counted(red):
    assert all(ex.caption_given for ex in red.examples)
    inst, ignored = db.with_prompt(red, "  a photo of   sks circle ")
    assert ignored == len(red) == 6
    assert {ex.caption for ex in inst.examples} == {INSTANCE}
    assert inst.caption(0, __import__("random").Random(0)) == INSTANCE
    assert torch.equal(inst.examples[0].pixels, red.examples[0].pixels)
    _, again = db.with_prompt(inst, INSTANCE)
    assert again == 0  # captions equal to the prompt are not "ignored"


# ---------------------------------------------------------------------------------------------- class images
def test_class_images_generated_once_and_completed(tiny_handles, monkeypatch, tmp_path, count_samples):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles["sd1"]
    s = spec()
    cls = db.class_image_set(h, s, seed=5, resolution=64)
    assert count_samples == [5, 6, 7]
    folder = db.class_images_folder(h, s, 5, 64)
    assert folder.parent == tmp_path / "class_images"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["00000.png", "00001.png", "00002.png"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    assert len(cls) == 3 and {ex.caption for ex in cls.examples} == {CLASS}
    assert tuple(cls.examples[0].pixels.shape) == (3, 64, 64)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}

    count_samples.clear()
    again = db.class_image_set(h, s, seed=5, resolution=64)  # a re-run reuses them
    assert count_samples == []
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(cls.examples, again.examples))
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.png")} == mtimes

    (folder / "00001.png").unlink()  # an interrupted set is completed, not regenerated
    db.class_image_set(h, s, seed=5, resolution=64)
    assert count_samples == [6]
    count_samples.clear()
    db.class_image_set(h, replace_spec(s, num_class_images=4), seed=5, resolution=64)  # more: only the new one
    assert count_samples == [8]
    count_samples.clear()
    # anything that changes the pixels gets its own folder
    assert db.class_images_folder(h, replace_spec(s, class_cfg=3.0), 5, 64) != folder
    assert db.class_images_folder(h, s, 6, 64) != folder
    assert db.class_images_folder(h.with_patch(LoraPatch(random_lora(h))), s, 5, 64) != folder

    # a training run with the same settings uses the cache
    out, lora, result = db.train_dreambooth(h, red_small(), TrainSettings(steps=1, seed=5), s)
    assert count_samples == [] and result.steps_done == 1


def replace_spec(s: db.DreamBoothSpec, **kw) -> db.DreamBoothSpec:
    from dataclasses import replace

    return replace(s, **kw)


def red_small():
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


def random_lora(handle, te: bool = False, scale: float = 0.05) -> LoraWeights:
    """A small LoRA on the first attention projection (and the first text-encoder q_proj)."""
    gen = torch.Generator().manual_seed(0)
    modules = {}
    targets = [("unet", handle.base.unet, "to_q")] + ([("te1", handle.base.text_encoders[0], "q_proj")] if te else [])
    for comp, model, suffix in targets:
        path, layer = next((n, m) for n, m in model.named_modules() if n.endswith(suffix))
        out_f, in_f = layer.weight.shape
        modules[(comp, path)] = LoraModule(down=torch.randn(2, in_f, generator=gen) * scale,
                                           up=torch.randn(out_f, 2, generator=gen) * scale, alpha=2.0)
    return LoraWeights(handle.family, modules, {}, "random")


# ---------------------------------------------------------------------------------------------- methods
def test_lora_method_lowers_instance_loss(tiny_handles, red):
    h = tiny_handles["sd1"]
    inst, _ = db.with_prompt(red, INSTANCE)
    unet_before = state(h.base.unet)
    before = evaluation_loss(h, inst)
    out, lora, result = db.train_dreambooth(h, red, TrainSettings(steps=20, learning_rate=1e-3, seed=0), spec())
    assert isinstance(lora, LoraWeights) and lora.modules and lora.name == "dreambooth"
    assert lora.metadata["ft_dreambooth_instance_prompt"] == INSTANCE
    assert lora.metadata["ft_dreambooth_class_images"] == "3"
    assert lora.metadata["ft_dreambooth_ignored_captions"] == "6"  # red-circle has a caption per image
    assert out.base is h.base and out.patches == h.patches + (LoraPatch(lora),)
    assert len(result.losses) == 20
    assert evaluation_loss(out, inst) < before
    assert same(unet_before, state(h.base.unet))


def test_full_method_trains_a_copy_and_leaves_the_input_untouched(tiny_handles, red):
    h = tiny_handles["sd1"]
    inst, _ = db.with_prompt(red, INSTANCE)
    unet_before, te_before = state(h.base.unet), state(h.base.text_encoders[0])
    before = evaluation_loss(h, inst)
    out, lora, result = db.train_dreambooth(h, red, TrainSettings(steps=20, learning_rate=1e-4, seed=0),
                                            spec(method="full", train_text_encoder=True, text_learning_rate=1e-4))
    assert lora is None and len(result.losses) == 20
    assert same(unet_before, state(h.base.unet)) and same(te_before, state(h.base.text_encoders[0]))
    assert out.base is not h.base and out.patches == ()
    assert out.base.unet is not h.base.unet and out.base.text_encoders[0] is not h.base.text_encoders[0]
    assert out.base.vae is h.base.vae and out.base.lock is not h.base.lock
    assert out.base.label.startswith(f"{h.base.label} + DreamBooth")
    assert out.base.dtype == h.base.dtype and next(out.base.unet.parameters()).dtype == h.base.dtype
    assert not any(p.requires_grad for p in out.base.unet.parameters())
    assert not same(unet_before, state(out.base.unet))
    assert not same(te_before, state(out.base.text_encoders[0]))
    assert evaluation_loss(out, inst) < before


def test_full_method_bakes_the_input_loras(tiny_handles, red):
    h0 = tiny_handles["sd1"]
    h = h0.with_patch(LoraPatch(random_lora(h0, te=True)))
    with h.patched():
        merged_unet, merged_te = state(h.base.unet), state(h.base.text_encoders[0])
    plain_unet, plain_te = state(h0.base.unet), state(h0.base.text_encoders[0])
    assert not same(merged_unet, plain_unet) and not same(merged_te, plain_te)
    out, _, _ = db.train_dreambooth(h, red, TrainSettings(steps=1, learning_rate=1e-12, seed=0),
                                    spec(method="full", prior_preservation=False))
    assert out.patches == () and not out.loras
    # the text encoder was not trained but carried the LoRA: copied with it baked in, bit for bit
    assert out.base.text_encoders[0] is not h.base.text_encoders[0]
    assert same(merged_te, state(out.base.text_encoders[0]))
    trained = state(out.base.unet)  # one step at lr 1e-12: the merged weights up to rounding
    assert all(torch.allclose(trained[k], merged_unet[k], atol=1e-6) for k in merged_unet)
    assert same(plain_unet, state(h.base.unet)) and same(plain_te, state(h.base.text_encoders[0]))


def test_full_method_resumes_from_its_checkpoint(tiny_handles, red):
    h = tiny_handles["sd1"]
    s = spec(method="full", prior_preservation=False)
    first, _, r1 = db.train_dreambooth(h, red, TrainSettings(steps=2, learning_rate=1e-4, seed=3, save_every=1), s)
    assert r1.checkpoint is not None and r1.checkpoint.exists()
    again, _, r2 = db.train_dreambooth(h, red, TrainSettings(steps=2, learning_rate=1e-4, seed=3, resume=True), s)
    assert r2.resumed_from == 2 and r2.losses == r1.losses
    assert same(state(first.base.unet), state(again.base.unet))
    assert not same(state(h.base.unet), state(again.base.unet))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_base_prediction_prior_starts_at_zero(tiny_handles, red, method):
    h = tiny_handles["sd1"]
    settings = TrainSettings(steps=3, learning_rate=1e-3 if method == "lora" else 1e-4, seed=0, batch_size=2)
    s = spec(method=method, prior_mode="base_prediction", num_class_images=0)
    inst, _ = db.with_prompt(red, INSTANCE)
    obj = db.dreambooth_objective(h, inst, settings, s, node="test")
    batch = next(db.PairedSet(inst).batches(2, 0))
    with prepared(obj, h, settings, node="test") as run:
        instance, prior = obj.terms(0, batch, step_generator(0, 0), run.denoiser)
        assert instance.shape == prior.shape == (2,)
        assert float(instance.detach().min()) > 0.01
        assert float(prior.detach().abs().max()) < 1e-10  # the trained model is still the frozen one
        loss = run.loss(0, batch, step_generator(0, 0))
        assert float(loss.detach()) == pytest.approx(float(instance.detach().mean()), abs=1e-8)
        loss.backward()  # gradients reach the trainables
        assert any(p.grad is not None for g in obj.param_groups() for p in g["params"])
    if method == "lora":  # adapters removed again, base intact
        assert not any("lora_A" in n for n, _ in h.base.unet.named_modules())
    out, lora, result = db.train_dreambooth(h, red, settings, s)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("fam", ["sd2", "sdxl"])
def test_other_families_run(tiny_handles, red, fam, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles[fam]
    out, lora, result = db.train_dreambooth(h, red, TrainSettings(steps=2, learning_rate=1e-3, seed=0, batch_size=2),
                                            spec(num_class_images=1, train_text_encoder=True))
    assert len(result.losses) == 2 and lora.components() >= {"unet", "te1"}
    out, lora, result = db.train_dreambooth(h, red, TrainSettings(steps=2, learning_rate=1e-5, seed=0),
                                            spec(method="full", prior_mode="base_prediction"))
    assert lora is None and len(result.losses) == 2 and out.base.family is h.base.family


def test_class_dataset_is_used_instead_of_generating(tiny_handles, red, striped, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("class images must come from class_dataset")

    monkeypatch.setattr(db, "sample", forbidden)
    out, lora, result = db.train_dreambooth(tiny_handles["sd1"], red, TrainSettings(steps=2, seed=0), spec(),
                                            class_dataset=striped)
    assert lora.metadata["ft_dreambooth_class_images"] == str(len(striped))


# ---------------------------------------------------------------------------------------------- node
NODE_DEFAULTS = dict(instance_prompt=INSTANCE, class_prompt=CLASS, method="lora", prior_preservation=True,
                     prior_loss_weight=1.0, prior_mode="class_images", num_class_images=2, train_text_encoder=False,
                     text_learning_rate=5e-6, rank=4, alpha=4.0, steps=2, learning_rate=1e-3, batch_size=1,
                     grad_accum=1, lr_schedule="constant", warmup_steps=0, optimizer="adamw", precision="fp32",
                     gradient_checkpointing=False, min_snr_gamma=0.0, noise_offset=0.0, seed=0, class_sample_steps=2)


def node_run(pipe, dataset, **kw):
    return DreamBoothTrain().run(pipe, dataset, **{**NODE_DEFAULTS, **kw})


def test_node_schema():
    types = DreamBoothTrain.INPUT_TYPES()
    required, optional = types["required"], types["optional"]
    assert list(required)[:13] == ["pipe", "dataset", "instance_prompt", "class_prompt", "method",
                                   "prior_preservation", "prior_loss_weight", "prior_mode", "num_class_images",
                                   "train_text_encoder", "text_learning_rate", "rank", "alpha"]
    assert required["steps"][1]["default"] == 400 and required["dataset"][0] == "FT_DATASET"
    assert optional["class_dataset"][0] == "FT_DATASET" and "validation_prompt" in optional
    assert DreamBoothTrain.RETURN_TYPES == ("FT_PIPE", "FT_LORA", "IMAGE", "IMAGE")
    assert DreamBoothTrain.CATEGORY == "finetune/training"
    assert DreamBoothTrain.DISPLAY_NAME == "DreamBooth Train (Finetune)"
    assert len(DreamBoothTrain.RETURN_NAMES) == len(DreamBoothTrain.OUTPUT_TOOLTIPS) == 4
    params = inspect.signature(DreamBoothTrain.run).parameters
    for section in (required, optional):
        for name, (typ, opts) in section.items():
            assert opts.get("tooltip", "").strip(), name
            if isinstance(typ, list):
                assert opts["default"] in typ
            if typ in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], name
    for name in optional:
        if name in params:
            assert params[name].default is not inspect.Parameter.empty
    assert repr(DreamBoothTrain.INPUT_TYPES()) == repr(types)


def test_node_end_to_end(tiny_handles, red):
    h = tiny_handles["sd1"]
    pipe, lora, plot, grid = node_run(h, red, validation_prompt=INSTANCE, validation_size=64, validation_steps=2)
    assert lora.modules and pipe.loras[-1].lora is lora and pipe.base is h.base
    assert plot.ndim == 4 and plot.shape[-1] == 3
    assert tuple(grid.shape[1:]) != (64, 64, 3) or grid.abs().sum() > 0  # a real validation image
    pipe, lora, plot, grid = node_run(h, red, method="full", learning_rate=1e-5, prior_mode="base_prediction",
                                      validation_prompt=INSTANCE, validation_size=64, validation_steps=2,
                                      validate_every=1)
    assert isinstance(lora, LoraWeights) and lora.modules == {}  # empty for full: the weights are in the pipe
    assert pipe.base is not h.base and pipe.base.unet is not h.base.unet
    assert grid.ndim == 4 and grid.shape[-1] == 3


@pytest.mark.parametrize("bad,input", [
    (dict(prior_loss_weight=-0.5), "prior_loss_weight"),
    (dict(instance_prompt="   "), "instance_prompt"),
    (dict(num_class_images=0), "num_class_images"),
    (dict(class_prompt=""), "class_prompt"),
    (dict(method="lora", rank=0), "rank"),
    (dict(steps=0), "steps"),
])
def test_bad_input_is_reported(tiny_handles, red, monkeypatch, bad, input):
    monkeypatch.setattr(db, "sample", lambda *a, **k: pytest.fail("validation must come before generation"))
    with pytest.raises(FinetuneError) as err:
        node_run(tiny_handles["sd1"], red, **bad)
    e = err.value
    assert e.node == "DreamBoothTrain" and e.input == input and e.fix
    assert str(e).startswith("[DreamBoothTrain]") and "Fix:" in str(e)


def test_no_class_images_needed_without_prior_or_with_base_prediction(tiny_handles, red, monkeypatch):
    monkeypatch.setattr(db, "sample", lambda *a, **k: pytest.fail("no class images needed"))
    for kw in (dict(prior_preservation=False), dict(prior_mode="base_prediction")):
        pipe, lora, _, _ = node_run(tiny_handles["sd1"], red, num_class_images=0, steps=1, **kw)
        assert lora.modules


@pytest.mark.parametrize("method", ["lora", "full"])
def test_prior_weight_is_applied_in_training(tiny_handles, red, striped, method):
    """The first step's loss is instance + w * prior on the same batch and noise: linear in w."""
    first = []
    for w in (0.0, 1.0, 2.5):
        _, _, result = db.train_dreambooth(
            tiny_handles["sd1"], red, TrainSettings(steps=1, learning_rate=1e-4, batch_size=2, seed=3),
            spec(method=method, prior_loss_weight=w, prior_mode="class_images"), class_dataset=striped)
        first.append(result.losses[0])
    instance, prior = first[0], first[1] - first[0]
    assert prior > 1e-4, "the class batch must contribute a prior term"
    assert first[2] == pytest.approx(instance + 2.5 * prior, rel=1e-4)


def test_full_offload_moves_the_input_unet_unless_the_prior_reads_it(tiny_handles, red, offload_moves):
    """offload_frozen with method full: the input UNet waits on the CPU too (only validation reads it), except with
    the base_prediction prior, whose targets are its predictions every step."""
    h = tiny_handles["sd1"]
    for mode, moved in (("class_images", True), ("base_prediction", False)):
        offload_moves.clear()
        settings = TrainSettings(steps=1, learning_rate=1e-5, seed=0, offload_frozen=True, cache_to_disk=False)
        db.train_dreambooth(h, red, settings, spec(method="full", prior_mode=mode, num_class_images=1))
        assert any(m is h.base.vae and d == "cpu" for m, d in offload_moves)
        assert any(m is h.base.unet and d == "cpu" for m, d in offload_moves) == moved, mode
