"""LoadBase / AddLoRA / NegativePrompt / Sample as nodes: single files, LoRA patches, isolation, diffusers parity."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family
from comfy_finetune.core.ldm import diffusers_to_ldm
from comfy_finetune.core.lora import LoraModule, LoraWeights, to_diffusers_state_dict, to_kohya_state_dict
from comfy_finetune.nodes import NODE_CLASS_MAPPINGS as N
from comfy_finetune.nodes.generation import Negative

SAMPLE = dict(prompt="a red circle", seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", width=64,
              height=64, batch_size=1)


def run(node_id, **kwargs):
    out = getattr(N[node_id](), N[node_id].FUNCTION)(**kwargs)
    return out["result"] if isinstance(out, dict) else out


def load(name, dtype="fp32"):
    return run("LoadBase", ckpt_name=name, dtype=dtype, device="cpu")[0]


def sample(pipe, **kw):
    return run("Sample", pipe=pipe, **{**SAMPLE, **kw})[0]


@pytest.fixture(scope="session")
def single_files(models_dir, tiny_handles):
    """Each tiny model also saved as an A1111/ComfyUI single-file checkpoint in models/checkpoints."""
    names = {}
    for fam, handle in tiny_handles.items():
        b = handle.base
        sd = diffusers_to_ldm(b.family, b.unet.state_dict(), b.vae.state_dict(),
                              [te.state_dict() for te in b.text_encoders], unet_config=dict(b.unet.config),
                              vae_config=dict(b.vae.config))
        name = f"tiny-{fam}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(models_dir / "checkpoints" / name))
        names[fam] = name
    return names


def _random_lora(handle, seed=0, rank=4) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for comp in handle.base.component_names:
        model = handle.base.component(comp)
        for path, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and path.endswith(("to_q", "to_v", "q_proj", "out_proj", "fc1")):
                out_f, in_f = m.weight.shape
                mods[(comp, path)] = LoraModule(torch.randn(rank, in_f, generator=g) * 0.3,
                                                torch.randn(out_f, rank, generator=g) * 0.3, alpha=2.0)
    return LoraWeights(handle.family, mods, {}, f"random{seed}")


@pytest.fixture(scope="session")
def lora_files(models_dir, tiny_handles):
    """A random LoRA per family in kohya layout, and the SD1 one also in diffusers layout."""
    names = {}
    for fam, h in tiny_handles.items():
        lw = _random_lora(h, seed=1)
        sd, meta = to_kohya_state_dict(lw, family=h.family, unet_config=dict(h.base.unet.config))
        save_file(sd, str(models_dir / "loras" / f"kohya-{fam}.safetensors"), metadata=meta)
        names[fam] = f"kohya-{fam}.safetensors"
    h = tiny_handles["sd1"]
    sd, meta = to_diffusers_state_dict(_random_lora(h, seed=1), family=h.family, unet_config=dict(h.base.unet.config))
    save_file(sd, str(models_dir / "loras" / "diffusers-sd1.safetensors"), metadata=meta)
    names["diffusers-sd1"] = "diffusers-sd1.safetensors"
    return names


def test_single_file_matches_diffusers_folder(single_files, family):
    from_file, from_folder = load(single_files[family]), load(f"diffusers/tiny-{family}")
    assert from_file.family is Family(family)
    assert from_file.base.prediction_type == from_folder.base.prediction_type
    assert torch.allclose(sample(from_file), sample(from_folder), atol=1e-4)


def test_same_file_loaded_twice_reuses_weights(single_files):
    a, b = load(single_files["sd1"]), load(single_files["sd1"])
    assert a.base is b.base
    assert load(single_files["sd1"], dtype="bf16").base is not a.base


def test_missing_and_unsupported_models(models_dir):
    with pytest.raises(FinetuneError, match=r"\[LoadBase\] input 'ckpt_name'.*not found.*Fix:"):
        load("nope.safetensors")
    (models_dir / "checkpoints" / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(FinetuneError, match=r"\[LoadBase\].*junk.safetensors"):
        load("junk.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(models_dir / "checkpoints" / "other.safetensors"))
    with pytest.raises(FinetuneError, match=r"\[LoadBase\] input 'ckpt_name'"):
        load("other.safetensors")


def test_lora_patch_isolation_bit_for_bit(tiny_handles, lora_files, family):
    base = tiny_handles[family]
    before = sample(base)
    with_lora = run("AddLoRA", pipe=base, lora_name=lora_files[family], strength_unet=1.0, strength_text=1.0)[0]
    assert with_lora is not base and base.patches == () and len(with_lora.patches) == 1
    patched = sample(with_lora)
    assert not torch.equal(patched, before)
    after = sample(base)
    assert torch.equal(after, before), "sampling the base after a LoRA run must give the same image, bit for bit"
    assert torch.equal(sample(with_lora), patched)


def test_strength_zero_is_exactly_no_effect(tiny_handles, lora_files):
    base = tiny_handles["sd1"]
    zero = run("AddLoRA", pipe=base, lora_name=lora_files["sd1"], strength_unet=0.0, strength_text=0.0)[0]
    assert torch.equal(sample(zero), sample(base))
    te_only = run("AddLoRA", pipe=base, lora_name=lora_files["sd1"], strength_unet=0.0, strength_text=1.0)[0]
    assert not torch.equal(sample(te_only), sample(base))


def test_chained_loras_add_up(tiny_handles, lora_files):
    base = tiny_handles["sd1"]
    one = run("AddLoRA", pipe=base, lora_name=lora_files["sd1"], strength_unet=0.5, strength_text=0.5)[0]
    two = run("AddLoRA", pipe=one, lora_name=lora_files["sd1"], strength_unet=0.5, strength_text=0.5)[0]
    full = run("AddLoRA", pipe=base, lora_name=lora_files["sd1"], strength_unet=1.0, strength_text=1.0)[0]
    assert len(two.patches) == 2 and len(one.patches) == 1
    assert torch.allclose(sample(two), sample(full), atol=1e-5)


def test_kohya_and_diffusers_layouts_give_the_same_image(tiny_handles, lora_files):
    base = tiny_handles["sd1"]
    k = run("AddLoRA", pipe=base, lora_name=lora_files["sd1"], strength_unet=1.0, strength_text=1.0)[0]
    d = run("AddLoRA", pipe=base, lora_name=lora_files["diffusers-sd1"], strength_unet=1.0, strength_text=1.0)[0]
    assert torch.allclose(sample(k), sample(d), atol=1e-5)


def test_trained_lora_input_and_family_check(tiny_handles):
    sd1 = tiny_handles["sd1"]
    lw = _random_lora(sd1, seed=4)
    out = run("AddLoRA", pipe=sd1, lora_name="None", strength_unet=1.0, strength_text=1.0, lora=lw)[0]
    assert not torch.equal(sample(out), sample(sd1))
    xl_lora = _random_lora(tiny_handles["sdxl"], seed=4)
    with pytest.raises(FinetuneError,
                       match=r"\[AddLoRA\] input 'lora': this LoRA is for SDXL but the model is SD 1.x"):
        run("AddLoRA", pipe=sd1, lora_name="None", strength_unet=1.0, strength_text=1.0, lora=xl_lora)
    with pytest.raises(FinetuneError, match=r"\[AddLoRA\] input 'lora_name': no LoRA given"):
        run("AddLoRA", pipe=sd1, lora_name="None", strength_unet=1.0, strength_text=1.0)


def test_lora_for_other_family_file_refused(tiny_handles, lora_files):
    with pytest.raises(FinetuneError, match=r"\[AddLoRA\].*SDXL.*SD 1.x"):
        run("AddLoRA", pipe=tiny_handles["sd1"], lora_name=lora_files["sdxl"], strength_unet=1.0, strength_text=1.0)


def test_every_family_mismatch_has_one_wording(tiny_handles, lora_files, models_dir):
    """A file (AddLoRA's lora_name), a trained LoRA (AddLoRA's lora, SaveLoRA) and the core writer all say the same:
    the LoRA's family, the model's family and the fix; each node names itself, the core names no node."""
    from comfy_finetune.core.families import family_mismatch
    from comfy_finetune.training.saving import save_lora

    sd1, xl_lora = tiny_handles["sd1"], _random_lora(tiny_handles["sdxl"], seed=2)
    want = str(family_mismatch("LoRA", Family.SDXL, Family.SD1))
    assert want == ("this LoRA is for SDXL but the model is SD 1.x. "
                    "Fix: use a LoRA made for SD 1.x, or load the SDXL model it was made for.")
    calls = {
        "[AddLoRA] input 'lora_name': ": lambda: run("AddLoRA", pipe=sd1, lora_name=lora_files["sdxl"],
                                                     strength_unet=1.0, strength_text=1.0),
        "[AddLoRA] input 'lora': ": lambda: run("AddLoRA", pipe=sd1, lora_name="None", strength_unet=1.0,
                                                strength_text=1.0, lora=xl_lora),
        "[FinetuneSaveLoRA] input 'lora': ": lambda: run("FinetuneSaveLoRA", lora=xl_lora, pipe=sd1, name="mismatch",
                                                         layout="kohya", overwrite=False),
        "input 'lora': ": lambda: save_lora(xl_lora, models_dir / "loras" / "mismatch.safetensors", family="sd1",
                                            unet_config=dict(sd1.base.unet.config)),
    }
    head, tail = want.split(". Fix: ")
    for prefix, call in calls.items():
        with pytest.raises(FinetuneError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(prefix + head), msg  # the file's evidence may follow in brackets
        assert msg.endswith(". Fix: " + tail), msg
    assert not (models_dir / "loras" / "mismatch.safetensors").exists()


def test_unmatched_keys_reported(tiny_handles, lora_files, models_dir):
    from safetensors.torch import load_file

    sd = load_file(str(models_dir / "loras" / lora_files["sd1"]))
    sd["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, str(models_dir / "loras" / "extra-keys.safetensors"))
    out = N["AddLoRA"]().run(pipe=tiny_handles["sd1"], lora_name="extra-keys.safetensors",
                                          strength_unet=1.0, strength_text=1.0)
    assert isinstance(out, dict) and "no_such_block" in out["ui"]["text"][0]


def test_negative_prompt_changes_image(tiny_handles):
    h = tiny_handles["sd1"]
    neg = run("NegativePrompt", text="blue square")[0]
    assert isinstance(neg, Negative)
    assert not torch.equal(sample(h, negative=neg), sample(h))


def test_matches_plain_diffusers_pipeline_with_lora(tiny_handles, lora_files, models_dir):
    """Same scheduler, steps, size, seed and LoRA: our Sample equals diffusers' pipeline + load_lora_weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from comfy_finetune.core.sampling import comfy_noise

    h = tiny_handles["sd1"]
    ours = sample(run("AddLoRA", pipe=h, lora_name=lora_files["sd1"], strength_unet=1.0, strength_text=1.0)[0],
                  negative=Negative(""))
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd1", safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.load_lora_weights(str(models_dir / "loras"), weight_name=lora_files["sd1"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(SAMPLE["prompt"], negative_prompt="", num_inference_steps=3, guidance_scale=5.0, height=64,
               width=64, latents=comfy_noise(3, (1, 4, 8, 8)), output_type="pt").images
    assert torch.allclose(ours, ref.permute(0, 2, 3, 1), atol=2e-4)


def test_in_graph_lora_from_another_model_of_the_family_refused(tiny_handles, models_dir):
    """Same family, other layer sizes: a clear AddLoRA error instead of a crash inside Sample."""
    from comfy_finetune.core.handle import ModelHandle

    sd1 = tiny_handles["sd1"]
    lw = _random_lora(sd1, seed=9)
    (path, module), *_ = [(k, m) for k, m in lw.modules.items() if k[0] == "unet"]
    wrong = dict(lw.modules)
    wrong[path] = LoraModule(torch.zeros(4, module.down.shape[1] * 2), module.up, alpha=2.0)
    bad = LoraWeights(sd1.family, wrong, {}, "other-model")
    with pytest.raises(FinetuneError, match=r"\[AddLoRA\] input 'lora': this LoRA does not fit the model.*Fix"):
        run("AddLoRA", pipe=sd1, lora_name="None", strength_unet=1.0, strength_text=1.0, lora=bad)
    assert isinstance(sd1, ModelHandle) and sd1.patches == ()
