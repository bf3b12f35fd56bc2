"""Kolors on a tiny model built at test time: detection, ChatGLM tokens and conditioning, Sample vs diffusers'
KolorsPipeline, and the clear errors (tokenizer missing, wrong text encoder, prompt too long, no sentencepiece)."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

from comfy_finetune.core import kolors as K
from comfy_finetune.core.conditioning import encode_prompt
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family, modelspec_keys
from comfy_finetune.core.handle import ModelHandle
from comfy_finetune.core.loading import load_diffusers_folder
from comfy_finetune.core.sampling import SampleSettings, comfy_noise, sample
from comfy_finetune.nodes import NODE_CLASS_MAPPINGS as N

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
PROMPTS = ("一只红色的狗 on a 黑色 background", "a photo of a dog, high quality", "高质量，细节丰富", "")


@pytest.fixture(scope="module")
def kolors_dir(models_dir):
    from comfy_finetune.core.tiny import build_tiny_kolors_folder

    folder = models_dir / "diffusers" / "tiny-kolors"
    if not (folder / "model_index.json").exists():
        build_tiny_kolors_folder(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def handle(kolors_dir):
    return ModelHandle(load_diffusers_folder(kolors_dir, torch.float32, CPU))


def _reference_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_kolors_folder_is_detected_and_loads_through_load_base(kolors_dir, handle):
    base = handle.base
    assert base.family is Family.KOLORS and base.family.label == "Kolors"
    assert type(base.text_encoders[0]).__name__ == "ChatGLMModel" and len(base.tokenizers) == 1
    assert base.scheduler_config["num_train_timesteps"] == 1100 and base.scheduler_config["beta_end"] == 0.014
    assert base.info.size_conditioning and base.info.latent_scale == 0.13025
    node = getattr(N["LoadBase"](), N["LoadBase"].FUNCTION)(ckpt_name="diffusers/tiny-kolors", dtype="fp32",
                                                           device="cpu")
    pipe = node["result"][0] if isinstance(node, dict) else node[0]
    assert pipe.family is Family.KOLORS
    assert modelspec_keys("kolors", "lora")["modelspec.architecture"] == "kolors/lora"


@pytest.mark.parametrize("text", PROMPTS)
def test_tokens_are_the_reference_tokenizers(handle, text):
    tok = handle.base.tokenizers[0]
    ours = [t.id for t in K.tokenize(tok, text).tokens]
    assert ours == tok(text).input_ids  # prefix [gMASK] sop, then SentencePiece's pieces of the whole text
    ref = tok(text, padding="max_length", max_length=K.MAX_TOKENS, return_tensors="pt")
    padded = K.padded_inputs(tok, [ours], CPU)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(padded[key], ref[key]), key


def test_weights_go_to_the_tokens_of_the_weighted_text(handle):
    tok = handle.base.tokenizers[0]
    plain = K.tokenize(tok, "一只红色的狗 on a black background")
    weighted = K.tokenize(tok, "一只红色的(狗:1.5) on a (black:0.5) background")
    assert [t.id for t in weighted.tokens] == [t.id for t in plain.tokens]  # the syntax never changes the tokens
    marked = {tok.convert_ids_to_tokens(t.id): t.weight for t in weighted.tokens if t.weight != 1.0}
    assert marked and set(marked.values()) == {1.5, 0.5}
    assert all("狗" in p for p, w in marked.items() if w == 1.5)
    assert all("b" in p or "l" in p or "ack" in p for p, w in marked.items() if w == 0.5)
    # the conditioning: unchanged where the weight is 1, changed where it is not
    with handle.patched():
        a = encode_prompt(handle, "一只红色的狗 on a black background")
        b = encode_prompt(handle, "一只红色的(狗:1.5) on a (black:0.5) background")
        c = encode_prompt(handle, "一只红色的(狗:1.0) on a black background")
    assert a.cond.shape == (1, K.MAX_TOKENS, 32) and a.pooled.shape == (1, 32)
    assert torch.equal(a.cond, c.cond)
    w = torch.tensor([1.0] * (K.MAX_TOKENS - len(weighted.tokens)) + [t.weight for t in weighted.tokens])
    changed = (a.cond - b.cond).abs().amax(dim=-1)[0] > 0
    assert torch.equal(changed, w != 1.0)
    assert torch.equal(a.pooled, b.pooled)  # the pooled embedding is the unweighted last token's


def test_conditioning_matches_the_pipelines_encode_prompt(kolors_dir, handle):
    pipe = _reference_pipeline(kolors_dir)
    for text in PROMPTS:
        ref_cond, _, ref_pooled, _ = pipe.encode_prompt(text, device=CPU, do_classifier_free_guidance=False)
        with handle.patched():
            ours = encode_prompt(handle, text)
        assert torch.allclose(ours.cond, ref_cond, atol=1e-6) and torch.allclose(ours.pooled, ref_pooled, atol=1e-6)


@pytest.mark.parametrize(("prompt", "negative"), [(PROMPTS[0], ""), ("a photo of a dog", "模糊，丑陋，低质量")])
def test_sample_matches_kolors_pipeline(kolors_dir, handle, prompt, negative):
    ours = sample(handle, SampleSettings(prompt=prompt, negative=negative, seed=3, steps=3, cfg=5.0, width=64,
                                         height=64))
    ref = _reference_pipeline(kolors_dir)(prompt, negative_prompt=negative, num_inference_steps=3,
                                          guidance_scale=5.0, height=64, width=64,
                                          latents=comfy_noise(3, (1, 4, 8, 8)), output_type="pt").images
    assert torch.allclose(ours, ref.permute(0, 2, 3, 1), atol=2e-4)


def test_negative_and_chinese_prompts_change_the_image(handle):
    s = SampleSettings(prompt="一只红色的狗", seed=1, steps=2, cfg=5.0, width=64, height=64)
    base = sample(handle, s)
    assert not torch.equal(base, sample(handle, SampleSettings(**{**s.__dict__, "prompt": "一只蓝色的猫"})))
    assert not torch.equal(base, sample(handle, SampleSettings(**{**s.__dict__, "negative": "模糊"})))


def test_an_embedding_is_spliced_into_the_chatglm_tokens(handle):
    from comfy_finetune.core.embeddings import Embedding
    from comfy_finetune.core.handle import EmbeddingPatch

    emb = Embedding("kolors-thing", {"te1": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                    token="<thing>")
    h = handle.with_patch(EmbeddingPatch(emb))
    tok = handle.base.tokenizers[0]
    with h.patched():
        a = encode_prompt(h, "a <thing> on a black background")
        b = encode_prompt(h, "a embedding:kolors-thing on a black background")
    plain = K.tokenize(tok, "a on a black background")
    assert torch.equal(a.cond, b.cond)
    assert len(K.tokenize(tok, "a embedding:kolors-thing x", embedding_size=lambda n: 2).tokens) == \
        len(K.tokenize(tok, "a x").tokens) + 2
    assert plain.tokens  # a prompt without the embedding still encodes
    with pytest.raises(FinetuneError, match=r"\[S\] input 'prompt': embedding:nothing-here was not found"):
        with handle.patched():
            encode_prompt(handle, "a embedding:nothing-here", node="S")


# ---------------------------------------------------------------------------------------------- bad input
def test_a_prompt_over_256_tokens_is_refused_with_the_count(handle):
    long = "a photo of a dog " * 80
    with pytest.raises(FinetuneError, match=r"\[Sample\] input 'prompt': the prompt is \d+ tokens long; Kolors "
                                            r"reads at most 254.*Fix: shorten the prompt"):
        sample(handle, SampleSettings(prompt=long, steps=1, width=64, height=64), node="Sample")


def test_a_missing_tokenizer_says_where_it_looked(kolors_dir, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(kolors_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FinetuneError, match=r"input 'ckpt_name': Kolors' ChatGLM tokenizer was not found: looked "
                                            r"for '.*no-tokenizer/tokenizer/tokenizer.model'.*Fix: put"):
        load_diffusers_folder(broken, torch.float32, CPU)


def test_a_kolors_unet_with_a_clip_text_encoder_is_refused(kolors_dir, models_dir, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(kolors_dir, mixed)
    shutil.rmtree(mixed / "text_encoder")
    shutil.copytree(models_dir / "diffusers" / "tiny-sdxl" / "text_encoder", mixed / "text_encoder")
    with pytest.raises(FinetuneError, match=r"has a Kolors UNet .* but its text_encoder/ is not ChatGLM3.*Fix: put "
                                            r"Kolors' own text_encoder/"):
        load_diffusers_folder(mixed, torch.float32, CPU)
    sdxl_unet = tmp_path / "sdxl-unet"
    shutil.copytree(kolors_dir, sdxl_unet)
    shutil.rmtree(sdxl_unet / "unet")
    shutil.copytree(models_dir / "diffusers" / "tiny-sdxl" / "unet", sdxl_unet / "unet")
    with pytest.raises(FinetuneError, match=r"ChatGLM3 text encoder but its UNet has no text projection"):
        load_diffusers_folder(sdxl_unet, torch.float32, CPU)


def test_without_sentencepiece_the_error_says_how_to_install_it(kolors_dir, monkeypatch):
    real_import = builtins.__import__

    def no_sentencepiece(name, *args, **kwargs):
        if name == "sentencepiece":
            raise ImportError("No module named 'sentencepiece'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    with pytest.raises(FinetuneError, match=r"\[LoadBase\] input 'ckpt_name': Kolors' ChatGLM tokenizer needs the "
                                            r"'sentencepiece' package.*Fix: install it .*pip install sentencepiece"):
        K.load_chatglm_tokenizer(kolors_dir / "tokenizer", node="LoadBase")


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def shapes():
    from comfy_finetune.shapes import world as W

    return [W.Spec(s, "red", "black") for s in ("star", "circle", "square", "triangle")]


def _data(specs, caption):
    from comfy_finetune.shapes import personalization as P

    return P.dataset(specs, [caption] * len(specs))


def _node(node_id, **inputs):
    from comfy_finetune.shapes import personalization as P

    return P.run_node(N[node_id], **inputs)


@pytest.mark.parametrize("method", ["lora", "ti", "dreambooth"])
def test_each_trainer_lowers_a_fixed_noise_loss_on_kolors(handle, shapes, method):
    """UNet LoRA, Textual Inversion (new ChatGLM token rows only) and full DreamBooth with prior preservation, on
    Chinese captions; the loss at fixed noise and timesteps of the result is below the base's."""
    from comfy_finetune.training.diffusion import evaluation_loss

    common = dict(pipe=handle, recipe="custom", steps=30, seed=0, validation_size=64)
    if method == "lora":
        data = _data(shapes, "黑色背景上的红色星星")
        _, out, *_ = _node("FinetuneTrainLoRA", dataset=data, learning_rate=3e-3, batch_size=2, rank=4, **common)
        margin = 0.005
    elif method == "ti":
        data = _data(shapes, "黑色背景上的 <x>")
        emb, out, *_ = _node("LearnEmbedding", dataset=data, token="<x>", initializer="星星", templates="captions",
                             learning_rate=5e-2, **common)
        assert set(emb.vectors) == {"te1"} and emb.vectors["te1"].shape[1] == 32  # ChatGLM3 rows, one encoder
        margin = 0.001
    else:
        data = _data(shapes, "一只 sks 星星")
        out, *_ = _node("DreamBoothTrain", dataset=data, instance_prompt="一只 sks 星星", class_prompt="一只星星",
                        method="full", num_class_images=2, class_sample_steps=4, learning_rate=1e-4, **common)
        margin = 0.05
    before, after = evaluation_loss(handle, data), evaluation_loss(out, data)
    assert after < before * (1 - margin), (before, after)
    assert handle.patches == ()  # the input handle is untouched


def test_kolors_refusals_name_the_node_input_and_fix(handle, shapes):
    data = _data(shapes, "一只红色的星星")
    with pytest.raises(FinetuneError, match=r"\[FinetuneTrainLoRA\] input 'train_text_encoder': training Kolors' "
                                            r"ChatGLM3 text encoder is not supported yet.*Fix: turn "
                                            r"train_text_encoder off"):
        _node("FinetuneTrainLoRA", pipe=handle, dataset=data, recipe="custom", steps=2, train_text_encoder=True,
              validation_size=64)
    with pytest.raises(FinetuneError, match=r"\[FinetuneSaveCheckpoint\] input 'format': a Kolors model cannot be "
                                            r"saved as a single file.*Fix: set format to diffusers"):
        _node("FinetuneSaveCheckpoint", pipe=handle, name="kolors-model")


def test_a_fine_tuned_kolors_saves_as_a_diffusers_folder_that_both_loaders_read(kolors_dir, handle, kolors_lora,
                                                                                models_dir):
    """SaveCheckpoint (format diffusers, fp32) writes the model with its LoRA merged: Load Base Model and diffusers'
    KolorsPipeline read the folder back and draw what the LoRA-patched pipe draws."""
    patched = _node("AddLoRA", pipe=handle, lora_name="None", strength_unet=1.0, strength_text=1.0,
                    lora=kolors_lora)[0]
    name = "kolors-test/merged"
    _node("FinetuneSaveCheckpoint", pipe=patched, name=name, format="diffusers", dtype="fp32", overwrite=True)
    folder = models_dir / "diffusers" / name
    try:
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "KolorsPipeline"
        assert (folder / "tokenizer" / "tokenizer.model").is_file()
        expected = _lora_sample(patched)
        reloaded = _node("LoadBase", ckpt_name=f"diffusers/{name}", dtype="fp32", device="cpu")[0]
        assert reloaded.base.family is Family.KOLORS
        assert torch.allclose(_lora_sample(reloaded), expected, atol=1e-5)
        ref = _reference_pipeline(folder)
        theirs = ref("黑色背景上的红色星星", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                     latents=comfy_noise(5, (1, 4, 8, 8)), output_type="pt").images.permute(0, 2, 3, 1)
        assert torch.allclose(theirs, expected, atol=2e-4)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def kolors_lora(handle, shapes):
    """A UNet LoRA trained a few steps on Kolors (B away from zero, so it changes the image)."""
    data = _data(shapes, "黑色背景上的红色星星")
    lora, *_ = _node("FinetuneTrainLoRA", pipe=handle, dataset=data, recipe="custom", steps=4, learning_rate=2e-2,
                     rank=4, validation_size=64)
    return lora


def _lora_sample(pipe):
    return sample(pipe, SampleSettings(prompt="黑色背景上的红色星星", seed=5, steps=3, cfg=5.0, width=64, height=64))


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_kolors_lora_saves_and_loads_back_through_add_lora(handle, kolors_lora, layout, models_dir):
    """SaveLoRA writes the kohya layout (SGM UNet names as for SDXL) or the diffusers/PEFT one, named Kolors in the
    metadata; AddLoRA reads the file back to the same images as the LoRA connected in the graph."""
    from safetensors import safe_open

    name = f"kolors-test/{layout}"
    _node("FinetuneSaveLoRA", lora=kolors_lora, pipe=handle, name=name, layout=layout, overwrite=True)
    path = models_dir / "loras" / f"{name}.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["modelspec.architecture"] == "kolors/lora" and meta["ss_base_model_version"] == "kolors"
        if layout == "kohya":
            assert keys and all(k.startswith("lora_unet_") for k in keys)
            assert any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
                       for k in keys)
        else:
            assert keys and all(k.startswith("unet.") for k in keys)
        in_graph = _node("AddLoRA", pipe=handle, lora_name="None", strength_unet=1.0, strength_text=1.0,
                         lora=kolors_lora)[0]
        from_file = _node("AddLoRA", pipe=handle, lora_name=f"{name}.safetensors", strength_unet=1.0,
                          strength_text=1.0)[0]
        expected, got = _lora_sample(in_graph), _lora_sample(from_file)
        assert torch.allclose(got, expected, atol=1e-5)
        assert (got - _lora_sample(handle)).abs().max() > 1e-3  # the LoRA does change the image
        assert handle.patches == ()
    finally:
        path.unlink(missing_ok=True)


def test_diffusers_kolors_pipeline_reads_the_diffusers_layout(kolors_dir, handle, kolors_lora, models_dir):
    """KolorsPipeline.load_lora_weights on the file SaveLoRA wrote draws what Sample draws with the LoRA."""
    name = "kolors-test/for-diffusers"
    _node("FinetuneSaveLoRA", lora=kolors_lora, pipe=handle, name=name, layout="diffusers", overwrite=True)
    path = models_dir / "loras" / f"{name}.safetensors"
    try:
        ref = _reference_pipeline(kolors_dir)
        ref.load_lora_weights(str(path))
        prompt = "黑色背景上的红色星星"
        theirs = ref(prompt, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                     latents=comfy_noise(5, (1, 4, 8, 8)), output_type="pt").images.permute(0, 2, 3, 1)
        patched = _node("AddLoRA", pipe=handle, lora_name="None", strength_unet=1.0, strength_text=1.0,
                        lora=kolors_lora)[0]
        assert torch.allclose(_lora_sample(patched), theirs, atol=2e-4)
    finally:
        path.unlink(missing_ok=True)


def test_lora_family_is_read_from_the_metadata_between_sdxl_and_kolors(handle, kolors_lora, models_dir, tmp_path):
    """Kolors' UNet has SDXL's shapes, so the file's metadata decides: an SDXL LoRA is refused on Kolors and a
    Kolors LoRA on SDXL; a file that names no family is taken as fitting."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfy_finetune.core.lora import lora_from_file
    from comfy_finetune.training.saving import save_lora

    kohya = save_lora(kolors_lora, tmp_path / "k.safetensors", family=Family.KOLORS,
                      unet_config=dict(handle.base.unet.config))
    with safe_open(str(kohya), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    names = dict(unet_config=dict(handle.base.unet.config), unet_modules=None, te_modules=None)
    sdxl = {**meta, "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    save_file(tensors, str(tmp_path / "sdxl.safetensors"), metadata=sdxl)
    with pytest.raises(FinetuneError, match=r"input 'lora_name': this LoRA is for SDXL but the model is Kolors"):
        lora_from_file(tmp_path / "sdxl.safetensors", family=Family.KOLORS, **names)
    with pytest.raises(FinetuneError, match=r"this LoRA is for Kolors but the model is SDXL"):
        lora_from_file(kohya, family=Family.SDXL, **names)
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    weights, unmatched = lora_from_file(tmp_path / "bare.safetensors", family=Family.KOLORS, **names)
    assert weights.family is Family.KOLORS and unmatched == [] and weights.modules.keys() == kolors_lora.modules.keys()


def test_a_kolors_embedding_saves_and_loads_back_by_name(handle):
    from safetensors import safe_open

    from comfy_finetune.core.embeddings import Embedding
    from comfy_finetune.core.handle import EmbeddingPatch
    from comfy_finetune.training.saving import save_embedding_for

    emb = Embedding("k", {"te1": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}, token="<k>")
    path, word = save_embedding_for(emb, handle, "kolors-thing", overwrite=False, node="FinetuneSaveEmbedding")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "kolors/textual-inversion"
        assert torch.equal(f.get_tensor("emb_params"), emb.vectors["te1"])
    with handle.patched():
        from_file = encode_prompt(handle, f"a {word} on black")
    in_graph = handle.with_patch(EmbeddingPatch(emb))
    with in_graph.patched():
        assert torch.equal(from_file.cond, encode_prompt(in_graph, "a <k> on black").cond)


def test_on_a_gpu_chatglm_waits_on_the_cpu_while_the_unet_trains():
    """The trainers offload Kolors' frozen encoders on CUDA even with offload_frozen off (decided before any CUDA
    call, so it is checked here on the CPU); other families and the CPU follow the input."""
    from comfy_finetune.training.frame import offloads_frozen
    from comfy_finetune.training.settings import TrainSettings

    off, on = TrainSettings(offload_frozen=False), TrainSettings(offload_frozen=True)
    assert offloads_frozen(off, Family.KOLORS, "cuda") and offloads_frozen(off, Family.KOLORS, torch.device("cuda:0"))
    assert not offloads_frozen(off, Family.KOLORS, "cpu") and not offloads_frozen(off, Family.SDXL, "cuda")
    assert offloads_frozen(on, Family.SDXL, "cuda") and offloads_frozen(on, Family.KOLORS, "cpu")


def test_real_size_kolors_memory_estimates():
    """`python -m comfy_finetune.training.memory` prints Kolors LoRA at 1024 px, ChatGLM3 resident and offloaded;
    counted on the meta device. ChatGLM3-6B has 6.24 B parameters; offloading it takes 12.5 GB off the peak."""
    from comfy_finetune.training.memory import GB, kolors_estimates

    rows = kolors_estimates()
    assert {(r["where"], r["checkpointing"]) for r in rows} == {
        (w, c) for w in ("text encoder on the GPU", "offload_frozen") for c in (True, False)}
    assert 6.2e9 < rows[0]["text_encoder_params"] < 6.3e9
    by = {(r["where"], r["checkpointing"]): r["peak_gb"] for r in rows}
    for ckpt in (True, False):
        saved = by[("text encoder on the GPU", ckpt)] - by[("offload_frozen", ckpt)]
        assert 12.4 < saved < 12.9, saved  # ChatGLM3 and the VAE in bf16
    assert by[("offload_frozen", True)] < 10 < by[("text encoder on the GPU", True)]
    assert all(r["resolution"] == 1024 and r["kind"] == "lora" for r in rows) and GB == 1e9


def test_auto_recipe_on_kolors_is_kolors_with_its_prior_loss_weight(handle):
    """``auto`` picks the kolors recipe; DreamBooth takes Kolors' reference prior-loss weight 0.7 where left at the
    node default (1.0), and an input the user set wins."""
    from comfy_finetune.training import recipes

    assert recipes.resolve("auto", handle) == "kolors"
    defaults = {"prior_loss_weight": 1.0, "learning_rate": 1e-4, "rank": 16}
    out, applied = recipes.apply("kolors", "dreambooth_lora", dict(defaults), defaults)
    assert applied["prior_loss_weight"] == 0.7 and out["rank"] == 4
    out, applied = recipes.apply("kolors", "dreambooth_full", {**defaults, "prior_loss_weight": 0.5}, defaults)
    assert out["prior_loss_weight"] == 0.5 and "prior_loss_weight" not in applied


def test_the_kolors_example_workflow_trains_saves_and_samples_headless(models_dir, tmp_path, capsys):
    """extra_workflows/Train a Kolors LoRA (tiny).json (UI format) on the built-in kolors-tiny, shortened to 3 steps:
    the runner trains, samples from a Chinese prompt and saves a LoRA named Kolors."""
    from pathlib import Path

    from safetensors import safe_open

    import comfy_finetune
    from comfy_finetune import host
    from comfy_finetune.headless.runner import main, node_classes
    from comfy_finetune.headless.workflow import load_workflow

    path = Path(comfy_finetune.__file__).parent / "extra_workflows" / "Train a Kolors LoRA (tiny).json"
    api = load_workflow(json.loads(path.read_text(encoding="utf-8")), node_classes())
    (train,) = [n for n in api.values() if n["class_type"] == "FinetuneTrainLoRA"]
    (sampler,) = [n for n in api.values() if n["class_type"] == "Sample"]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in sampler["inputs"]["prompt"])  # a Chinese prompt
    train["inputs"].update(steps=3, validate_every=0)
    sampler["inputs"].update(steps=2)
    quick = tmp_path / "kolors.api.json"
    quick.write_text(json.dumps(api, ensure_ascii=False), encoding="utf-8")
    out, before = tmp_path / "out", host.output_dir()
    saved = models_dir / "loras" / "finetune" / "kolors-striped.safetensors"
    try:
        assert main(["run", str(quick), "--quiet", "--models", str(models_dir), "--output", str(out)]) == 0, \
            capsys.readouterr().err
        assert list(out.rglob("kolors_lora_*.png"))
        with safe_open(str(saved), "pt") as f:
            assert f.metadata()["modelspec.architecture"] == "kolors/lora" and list(f.keys())
    finally:
        saved.unlink(missing_ok=True)
        host.configure(output_dir=before)  # the session's output folder, as before the run


def test_sharded_text_encoder_weights_load(kolors_dir, handle, tmp_path):
    """ChatGLM3-6B ships in shards (an index and several safetensors files): the same weights in shards load to the
    same conditioning."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    sharded = tmp_path / "sharded"
    shutil.copytree(kolors_dir, sharded, ignore=shutil.ignore_patterns("text_encoder"))
    te = ChatGLMModel.from_pretrained(kolors_dir / "text_encoder")
    te.save_pretrained(sharded / "text_encoder", max_shard_size="20KB")
    files = sorted(p.name for p in (sharded / "text_encoder").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1, files
    other = ModelHandle(load_diffusers_folder(sharded, torch.float32, CPU))
    with handle.patched(), other.patched():
        a, b = encode_prompt(handle, PROMPTS[0]), encode_prompt(other, PROMPTS[0])
    assert torch.equal(a.cond, b.cond) and torch.equal(a.pooled, b.pooled)
