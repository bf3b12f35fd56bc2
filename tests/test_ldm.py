"""Single-file (LDM/SGM) <-> diffusers conversion: round trips, config inference, diffusers' converter as oracle."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family
from comfy_finetune.core.ldm import (
    detect_family,
    diffusers_to_ldm,
    ldm_to_diffusers,
    text_model_prefix,
    unet_name_map,
    vae_name_map,
)
from comfy_finetune.core.tiny import build_tiny_pipeline_folder

FAMILIES = [Family.SD1, Family.SD2, Family.SDXL]


def _weighted_modules(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}


class Tiny:
    """The tiny diffusers models of one family, loaded from a folder built by core.tiny."""

    def __init__(self, folder, family: Family):
        self.family = family
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.text = [CLIPTextModel.from_pretrained(folder / "text_encoder").eval()]
        if family is Family.SDXL:
            self.text.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval())

    def to_ldm(self) -> dict[str, torch.Tensor]:
        return diffusers_to_ldm(self.family, self.unet.state_dict(), self.vae.state_dict(),
                                [t.state_dict() for t in self.text], unet_config=self.unet.config,
                                vae_config=self.vae.config)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[Family, Tiny]:
    root = tmp_path_factory.mktemp("tiny_ldm")
    return {f: Tiny(build_tiny_pipeline_folder(root / f.value, f, seed=3), f) for f in FAMILIES}


# ------------------------------------------------------------------------------------------ name tables

REAL_UNETS = {
    Family.SD1: dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2),
    Family.SD2: dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                     attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2),
    Family.SDXL: dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                      transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816),
}
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_name_maps_cover_every_weighted_module(tiny, family):
    t = tiny[family]
    assert set(unet_name_map(t.unet.config)) == _weighted_modules(t.unet)
    assert set(vae_name_map(t.vae.config)) == _weighted_modules(t.vae)
    with torch.device("meta"):
        real = UNet2DConditionModel(**REAL_UNETS[family])
        real_vae = AutoencoderKL(**REAL_VAE)
    assert set(unet_name_map(real.config)) == _weighted_modules(real)
    assert set(vae_name_map(real_vae.config)) == _weighted_modules(real_vae)


def test_name_maps_known_names():
    sdxl = unet_name_map(REAL_UNETS[Family.SDXL])
    assert sdxl["add_embedding.linear_1"] == "label_emb.0.0"
    assert sdxl["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == \
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    assert sdxl["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert sdxl["mid_block.attentions.0.proj_in"] == "middle_block.1.proj_in"
    assert sdxl["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert sdxl["up_blocks.2.resnets.2.conv_shortcut"] == "output_blocks.8.0.skip_connection"
    sd1 = unet_name_map(REAL_UNETS[Family.SD1])
    assert sd1["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"  # level without attention
    assert sd1["down_blocks.0.attentions.1.proj_in"] == "input_blocks.2.1.proj_in"
    assert sd1["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.4.0.skip_connection"
    vae = vae_name_map(REAL_VAE)
    assert vae["decoder.up_blocks.0.resnets.2.conv1"] == "decoder.up.3.block.2.conv1"
    assert vae["encoder.mid_block.attentions.0.to_out.0"] == "encoder.mid.attn_1.proj_out"
    assert vae["encoder.down_blocks.1.resnets.0.conv_shortcut"] == "encoder.down.1.block.0.nin_shortcut"


# ------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(tiny, family):
    t = tiny[family]
    ldm = t.to_ldm()
    conv = ldm_to_diffusers(ldm)
    assert conv.family is family
    assert conv.unused_keys == []
    for got, model in [(conv.unet, t.unet), (conv.vae, t.vae)] + list(zip(conv.text_encoders, t.text)):
        ref = model.state_dict()
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert got[k].shape == v.shape and torch.equal(got[k], v), k
    # ...and back again gives the same single file.
    again = diffusers_to_ldm(family, conv.unet, conv.vae, conv.text_encoders, unet_config=conv.unet_config,
                             vae_config=conv.vae_config)
    assert set(again) == set(ldm) and all(torch.equal(again[k], ldm[k]) for k in ldm)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_uses_comfyui_names(tiny, family):
    ldm = tiny[family].to_ldm()
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert "model.diffusion_model.out.2.weight" in ldm
    if family is Family.SD1:
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in ldm
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4
    elif family is Family.SD2:
        assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in ldm
        assert "cond_stage_model.model.text_projection" not in ldm
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2
    else:
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in ldm
        assert "conditioner.embedders.1.model.ln_final.weight" in ldm
        proj = tiny[family].text[1].state_dict()["text_projection.weight"]
        assert torch.equal(ldm["conditioner.embedders.1.model.text_projection"], proj.T)
        assert "model.diffusion_model.label_emb.0.2.weight" in ldm
        assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in ldm)  # no attention at level 0


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, *args, **kwargs) -> None:
    with torch.no_grad():
        out_a, out_b = a(*args, **kwargs), b(*args, **kwargs)
    out_a = out_a[0] if isinstance(out_a, tuple) else out_a
    out_b = out_b[0] if isinstance(out_b, tuple) else out_b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_inferred_configs_rebuild_identical_models(tiny, family):
    t = tiny[family]
    conv = ldm_to_diffusers(t.to_ldm())
    ref_cfg = t.unet.config
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim",
                "use_linear_projection", "addition_embed_type", "addition_time_embed_dim", "attention_head_dim",
                "projection_class_embeddings_input_dim", "in_channels", "out_channels"):
        assert _plain(conv.unet_config.get(key)) == _plain(ref_cfg[key]), key
    assert _plain(UNet2DConditionModel(**conv.unet_config).config.transformer_layers_per_block) == \
        _plain(ref_cfg.transformer_layers_per_block)
    assert conv.vae_config["scaling_factor"] == t.vae.config.scaling_factor

    unet = UNet2DConditionModel(**conv.unet_config).eval()
    unet.load_state_dict(conv.unet, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, ref_cfg.cross_attention_dim, generator=g)
    kw = {}
    if family is Family.SDXL:
        pooled = ref_cfg.projection_class_embeddings_input_dim - 6 * ref_cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    _same_outputs(unet, t.unet, x, torch.tensor([10, 500]), ctx, **kw)

    vae = AutoencoderKL(**conv.vae_config).eval()
    vae.load_state_dict(conv.vae, strict=True)
    img = torch.randn(1, 3, 16, 16, generator=g)
    _same_outputs(vae, t.vae, img, sample_posterior=False)

    ids = torch.randint(0, t.text[0].config.vocab_size - 2, (2, 12), generator=g)
    for n_enc, (cfg, sd, ref) in enumerate(zip(conv.text_configs, conv.text_encoders, t.text)):
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            assert cfg[key] == getattr(ref.config, key), key
        # OpenCLIP towers are built with gelu (real SD2/bigG); the tiny models use quick_gelu throughout.
        expected_act = "gelu" if (family is Family.SD2 or n_enc == 1) else "quick_gelu"
        assert cfg["hidden_act"] == expected_act
        cls = CLIPTextModelWithProjection if n_enc == 1 else CLIPTextModel
        model = cls(CLIPTextConfig(**{**cfg, "hidden_act": ref.config.hidden_act})).eval()
        model.load_state_dict(sd, strict=True)
        _same_outputs(model, ref, ids)


# ------------------------------------------------------------------------------------------ oracle

@pytest.mark.parametrize("family", FAMILIES)
def test_matches_diffusers_single_file_converter(tiny, family):
    from diffusers.loaders.single_file_utils import (  # noqa: PLC0415 - oracle, tests only
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    t = tiny[family]
    ldm = t.to_ldm()
    ours = ldm_to_diffusers(ldm)
    for theirs, mine in ((convert_ldm_unet_checkpoint(ldm, dict(t.unet.config)), ours.unet),
                         (convert_ldm_vae_checkpoint(ldm, dict(t.vae.config)), ours.vae)):
        assert set(theirs) == set(mine)
        assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    if family is not Family.SD1:
        prefix = "cond_stage_model.model." if family is Family.SD2 else "conditioner.embedders.1.model."
        theirs = convert_open_clip_checkpoint(t.text[-1], ldm, prefix=prefix)
        mine = {k.removeprefix("text_model."): v for k, v in ours.text_encoders[-1].items()}
        theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
        assert set(theirs) == set(mine)
        assert all(torch.equal(theirs[k], mine[k]) for k in mine)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_configs_are_inferred(family):
    """Shapes of real SD1/SD2/SDXL models (meta tensors, no memory) give their diffusers configs back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: PLC0415

    te_cfgs = {Family.SD1: [(768, 12, False)], Family.SD2: [(1024, 23, False)],
               Family.SDXL: [(768, 12, False), (1280, 32, True)]}[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNETS[family])
        vae = AutoencoderKL(**REAL_VAE)
        texts = []
        for hidden, layers, proj in te_cfgs:
            cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, projection_dim=1280, bos_token_id=49406,
                                 eos_token_id=49407)
            texts.append((CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg))
    ldm = diffusers_to_ldm(family, unet.state_dict(), vae.state_dict(), [t.state_dict() for t in texts],
                           unet_config=unet.config, vae_config=vae.config)
    conv = ldm_to_diffusers(ldm)
    cfg = conv.unet_config
    real = REAL_UNETS[family]
    assert list(cfg["block_out_channels"]) == list(real["block_out_channels"])
    assert cfg["attention_head_dim"] == real["attention_head_dim"]
    assert cfg["transformer_layers_per_block"] == real.get("transformer_layers_per_block", 1)
    assert cfg["cross_attention_dim"] == real["cross_attention_dim"]
    assert cfg["use_linear_projection"] == real.get("use_linear_projection", False)
    assert cfg.get("addition_time_embed_dim") == real.get("addition_time_embed_dim")
    assert conv.vae_config["block_out_channels"] == list(REAL_VAE["block_out_channels"])
    assert [c["num_hidden_layers"] for c in conv.text_configs] == [n for _, n, _ in te_cfgs]
    assert [c["num_attention_heads"] for c in conv.text_configs] == [h // 64 for h, _, _ in te_cfgs]
    assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(conv.unet)


# ------------------------------------------------------------------------------------------ extras and refusals

def test_sd2_full_openclip_tower_drops_last_layer(tiny):
    t = tiny[Family.SD2]
    ldm = t.to_ldm()
    p = "cond_stage_model.model."
    n_before = t.text[0].config.num_hidden_layers
    for k in [k for k in ldm if k.startswith(p + "transformer.resblocks.0.")]:
        ldm[k.replace("resblocks.0.", f"resblocks.{n_before}.")] = ldm[k].clone()
    ldm[p + "text_projection"] = torch.randn(32, 32)
    ldm[p + "logit_scale"] = torch.tensor(4.6)
    conv = ldm_to_diffusers(ldm)
    assert conv.text_configs[0]["num_hidden_layers"] == n_before
    assert conv.unused_keys == []
    assert set(conv.text_encoders[0]) == set(t.text[0].state_dict())


def test_ignored_and_unused_keys(tiny):
    ldm = tiny[Family.SD1].to_ldm()
    ldm["model_ema.decay"] = torch.tensor(0.999)
    ldm["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    ldm["alphas_cumprod"] = torch.ones(1000)
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ldm["v_pred"] = torch.tensor([])
    ldm["something.else"] = torch.zeros(2)
    conv = ldm_to_diffusers(ldm)
    assert conv.prediction_hint == "v"
    assert conv.unused_keys == ["something.else"]
    assert ldm_to_diffusers(tiny[Family.SD1].to_ldm()).prediction_hint is None


def test_old_sd1_text_keys_without_text_model(tiny):
    ldm = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tiny[Family.SD1].to_ldm().items()}
    conv = ldm_to_diffusers(ldm)
    assert set(conv.text_encoders[0]) == set(tiny[Family.SD1].text[0].state_dict())


def test_text_key_prefix_follows_installed_transformers(tiny):
    t = tiny[Family.SDXL]
    assert text_model_prefix(False) == ("text_model." if any(k.startswith("text_model.") for k in
                                                             t.text[0].state_dict()) else "")
    assert text_model_prefix(True) == "text_model."
    # diffusers_to_ldm accepts either spelling of the HF keys.
    sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in t.text[0].state_dict().items()}
    a = diffusers_to_ldm(Family.SDXL, t.unet.state_dict(), t.vae.state_dict(), [sd, t.text[1].state_dict()],
                         unet_config=t.unet.config, vae_config=t.vae.config)
    assert set(a) == set(t.to_ldm())


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family(tiny, family):
    assert detect_family(tiny[family].to_ldm()) is family


def _error(state) -> FinetuneError:
    with pytest.raises(FinetuneError) as exc:
        ldm_to_diffusers(state)
    assert exc.value.node is None and exc.value.input == "ckpt_name"  # the core names no node; LoadBase does
    assert "SD 1.x, SD 2.x and SDXL" in str(exc.value)
    return exc.value


def test_refuses_inpainting(tiny):
    ldm = tiny[Family.SD1].to_ldm()
    w = ldm["model.diffusion_model.input_blocks.0.0.weight"]
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    msg = str(_error(ldm))
    assert "inpainting" in msg and "9 input channels" in msg and "SD 1.x" in msg


def test_refuses_refiner(tiny):
    ldm = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v
           for k, v in tiny[Family.SDXL].to_ldm().items() if not k.startswith("conditioner.embedders.0.transformer.")}
    assert "refiner" in str(_error(ldm))


def test_refuses_unknown_layouts(tiny):
    msg = str(_error({"foo.bar.weight": torch.zeros(2), "foo.baz": torch.zeros(1)}))
    assert "not an SD single-file checkpoint" in msg and "'foo.bar.*'" in msg
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(FinetuneError, match="is a LoRA"):
        ldm_to_diffusers(lora)
    unet_only = {k: v for k, v in tiny[Family.SD1].to_ldm().items() if k.startswith("model.diffusion_model.")}
    assert "without a known text encoder" in str(_error(unet_only))
