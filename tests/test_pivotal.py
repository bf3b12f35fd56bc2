"""Pivotal tuning: a new word's vectors and a LoRA trained together, bundled in one LoRA file (bundle_emb)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_finetune.core.conditioning import PromptEncoder
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.handle import EmbeddingPatch, LoraPatch
from comfy_finetune.core.lora import to_kohya_state_dict
from comfy_finetune.core.lora_handle import lora_for_handle, with_lora
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.nodes.generation import AddLoRA
from comfy_finetune.nodes.pivotal import PivotalTuning
from comfy_finetune.training import dreambooth as db
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.diffusion import evaluation_loss
from comfy_finetune.training.pivotal import PivotalSpec
from comfy_finetune.training.settings import TrainSettings
from comfy_finetune.training.ti_trainer import initial_vectors

TOKEN = "<piv>"
INSTANCE = f"a photo of {TOKEN} circle"
CLASS = "a photo of a circle"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def red(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


def db_spec(**kw) -> db.DreamBoothSpec:
    base = dict(instance_prompt=INSTANCE, class_prompt=CLASS, num_class_images=2, class_sample_steps=2, rank=4,
                alpha=4.0)
    return db.DreamBoothSpec(**{**base, **kw})


PIVOTAL = PivotalSpec(token=TOKEN, initializer="circle", num_vectors=2, embedding_learning_rate=1e-2)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cond(handle, prompt: str) -> torch.Tensor:
    with torch.no_grad(), handle.patched() as h:
        return PromptEncoder(h).encode(prompt).cond


def test_word_and_lora_train_together_and_the_input_stays(tiny_handles, red, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles["sd1"]
    inst, _ = db.with_prompt(red, INSTANCE)
    unet_before, te_before = state(h.base.unet), state(h.base.text_encoders[0])
    before = evaluation_loss(h, inst)
    out, lora, result = db.train_dreambooth(h, red, TrainSettings(steps=12, learning_rate=1e-3, seed=0),
                                            db_spec(prior_preservation=False), pivotal=PIVOTAL)
    assert len(result.losses) == 12 and lora.name == "pivotal" and lora.modules
    assert lora.metadata["ft_pivotal_token"] == TOKEN and lora.metadata["ft_pivotal_embedding"] == "piv"
    (emb,) = lora.embeddings.values()
    start = initial_vectors(h, PIVOTAL.ti_spec(), 0, "test")["te1"]
    assert emb.name == "piv" and emb.token == TOKEN and emb.vectors["te1"].shape == start.shape == (2, 32)
    assert float((emb.vectors["te1"] - start).abs().max()) > 1e-3  # the word learned
    assert any(float(m.up.abs().max()) > 0 for m in lora.modules.values())  # and so did the LoRA (B starts at 0)
    assert out.base is h.base and out.patches == h.patches + (LoraPatch(lora), EmbeddingPatch(emb))
    assert evaluation_loss(out, inst) < before
    assert same(unet_before, state(h.base.unet)) and same(te_before, state(h.base.text_encoders[0]))
    # the word is what the prompt reads: with the LoRA alone the token is plain text again
    assert not torch.allclose(cond(out, INSTANCE), cond(h.with_patch(LoraPatch(lora)), INSTANCE))


@pytest.mark.parametrize("fam,keys", [("sd1", {"bundle_emb.piv.string_to_param.*"}),
                                      ("sdxl", {"bundle_emb.piv.clip_l", "bundle_emb.piv.clip_g"})])
def test_saved_file_bundles_the_word_and_add_lora_applies_it(tiny_handles, red, fam, keys, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles[fam]
    out, lora, _ = db.train_dreambooth(h, red, TrainSettings(steps=2, learning_rate=1e-3, seed=1),
                                       db_spec(prior_preservation=False), pivotal=PIVOTAL)
    sd, meta = to_kohya_state_dict(lora, family=h.family, unet_config=dict(h.base.unet.config))
    assert {k for k in sd if k.startswith("bundle_emb.")} == keys
    widths = [int(te.config.hidden_size) for te in h.base.text_encoders]
    assert [tuple(sd[k].shape) for k in sorted(keys)] == [(2, w) for w in widths]
    plain, _ = to_kohya_state_dict(lora, family=h.family, unet_config=dict(h.base.unet.config), bundle=False)
    assert not any(k.startswith("bundle_emb.") for k in plain) and len(plain) == len(sd) - len(keys)
    path = tmp_path / "pivotal.safetensors"
    save_file(sd, str(path), metadata=meta)
    loaded, unmatched = lora_for_handle(path, h)
    assert not unmatched
    (emb,) = loaded.embeddings.values()
    assert emb.name == "piv" and emb.token == TOKEN  # the metadata names the trained word
    for comp, vec in lora.embeddings["piv"].vectors.items():
        assert torch.equal(emb.vectors[comp], vec)
    reloaded = with_lora(h, loaded)
    assert torch.allclose(cond(reloaded, INSTANCE), cond(out, INSTANCE), atol=1e-5)


def test_add_lora_node_brings_the_bundled_word(tiny_handles, red, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles["sd1"]
    _, lora, _ = db.train_dreambooth(h, red, TrainSettings(steps=1, learning_rate=1e-3, seed=2),
                                     db_spec(prior_preservation=False), pivotal=PIVOTAL)
    (added,) = AddLoRA().run(h, lora=lora, strength_unet=0.5, strength_text=0.0)
    assert added.embeddings["piv"] is lora.embeddings["piv"]  # whatever the strengths, as in A1111
    assert added.loras[-1].strength_unet == 0.5


def test_a_bundled_word_for_another_family_is_refused(tiny_handles, red, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles["sd1"]
    _, lora, _ = db.train_dreambooth(h, red, TrainSettings(steps=1, learning_rate=1e-3, seed=2),
                                     db_spec(prior_preservation=False), pivotal=PIVOTAL)
    sd, meta = to_kohya_state_dict(lora, family=h.family, unet_config=dict(h.base.unet.config))
    sd["bundle_emb.piv.string_to_param.*"] = torch.zeros(2, 7)  # not this model's token width
    path = tmp_path / "odd.safetensors"
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(FinetuneError) as err:
        lora_for_handle(path, h, node="AddLoRA")
    assert err.value.input == "lora_name" and "piv" in err.value.detail and "size 7" in err.value.detail


def test_resume_is_exact(tiny_handles, red, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles["sd1"]
    s = db_spec(prior_preservation=False)
    _, first, r1 = db.train_dreambooth(h, red, TrainSettings(steps=3, learning_rate=1e-3, seed=3, save_every=1), s,
                                       pivotal=PIVOTAL)
    _, again, r2 = db.train_dreambooth(h, red, TrainSettings(steps=3, learning_rate=1e-3, seed=3, resume=True), s,
                                       pivotal=PIVOTAL)
    assert r2.resumed_from == 3 and r2.losses == r1.losses
    assert torch.equal(first.embeddings["piv"].vectors["te1"], again.embeddings["piv"].vectors["te1"])
    assert all(torch.equal(first.modules[k].up, again.modules[k].up) for k in first.modules)


@pytest.mark.parametrize("kw,input", [({"instance_prompt": "a photo of sks circle"}, "instance_prompt"),
                                      ({"token": "two words"}, "token"),
                                      ({"embedding_learning_rate": 0.0}, "embedding_learning_rate")])
def test_bad_input_names_the_node_and_input(tiny_handles, red, kw, input):
    inputs = {"instance_prompt": INSTANCE, "class_prompt": CLASS, "token": TOKEN, "steps": 1, **kw}
    with pytest.raises(FinetuneError) as err:
        PivotalTuning().run(tiny_handles["sd1"], red, **inputs)
    assert err.value.node == "FinetunePivotalTuning" and err.value.input == input and err.value.fix


def test_node_outputs(tiny_handles, red, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h = tiny_handles["sd1"]
    pipe, lora, emb, plot, grid = PivotalTuning().run(h, red, instance_prompt=INSTANCE, class_prompt=CLASS,
                                                      token=TOKEN, steps=2, num_class_images=1,
                                                      class_sample_steps=1, recipe="custom", rank=2, alpha=2.0)
    assert emb is lora.embeddings["piv"] and pipe.embeddings["piv"] is emb
    assert lora.metadata["ft_dreambooth_class_images"] == "1"
    assert plot.ndim == 4 and grid.ndim == 4


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_save_lora_keeps_the_word_in_both_layouts(tiny_handles, red, fam, monkeypatch, tmp_path):
    """kohya: one file with bundle_emb keys; diffusers (whose loader refuses unknown keys): the LoRA file and the
    word beside it as <name>_emb.safetensors, an embedding file the pack, ComfyUI and diffusers read."""
    from safetensors import safe_open

    from comfy_finetune import host
    from comfy_finetune.core.embeddings import load_embedding_file
    from comfy_finetune.nodes.saving import SaveLoRA

    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path / "cache"))
    old = host._settings.models_dir
    host.configure(models_dir=tmp_path / "models")
    try:
        h = tiny_handles[fam]
        _, lora, _ = db.train_dreambooth(h, red, TrainSettings(steps=1, learning_rate=1e-3, seed=2),
                                         db_spec(prior_preservation=False), pivotal=PIVOTAL)
        SaveLoRA().run(lora, h, "sub/piv", layout="kohya")
        SaveLoRA().run(lora, h, "sub/piv_d", layout="diffusers")
    finally:
        host.configure(models_dir=old)
    folder = tmp_path / "models" / "loras" / "sub"
    assert sorted(p.name for p in folder.iterdir()) == ["piv.safetensors", "piv_d.safetensors",
                                                        "piv_d_emb.safetensors"]
    with safe_open(str(folder / "piv.safetensors"), "pt") as f:
        assert any(k.startswith("bundle_emb.piv.") for k in f.keys())
    with safe_open(str(folder / "piv_d.safetensors"), "pt") as f:
        assert not any(k.startswith("bundle_emb") for k in f.keys())
    widths = [int(te.config.hidden_size) for te in h.base.text_encoders]
    beside = load_embedding_file(folder / "piv_d_emb.safetensors", widths)
    for comp, vec in lora.embeddings["piv"].vectors.items():
        assert torch.equal(beside.vectors[comp], vec)


def test_the_word_stops_training_at_its_fraction(tiny_handles, red, monkeypatch, tmp_path):
    """embedding_fraction 0.5 of 4 steps: the word after 4 steps is the word after 2 (bit for bit: the same first two
    steps), while the LoRA goes on training; 0.0 keeps the starting vectors exactly."""
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path))
    h, s = tiny_handles["sd1"], db_spec(prior_preservation=False)

    def run(steps, fraction):
        settings = TrainSettings(steps=steps, learning_rate=1e-3, seed=4)
        pivotal = PivotalSpec(token=TOKEN, initializer="circle", num_vectors=2, embedding_learning_rate=1e-2,
                              embedding_fraction=fraction)
        return db.train_dreambooth(h, red, settings, s, pivotal=pivotal)[1]

    half, two = run(4, 0.5), run(2, 1.0)
    assert torch.equal(half.embeddings["piv"].vectors["te1"], two.embeddings["piv"].vectors["te1"])
    assert any(not torch.equal(half.modules[k].up, two.modules[k].up) for k in half.modules)
    start = initial_vectors(h, PIVOTAL.ti_spec(), 4, "test")["te1"]
    assert torch.equal(run(2, 0.0).embeddings["piv"].vectors["te1"], start)
    assert not torch.equal(two.embeddings["piv"].vectors["te1"], start)
