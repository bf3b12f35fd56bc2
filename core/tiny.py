"""Tiny SD-family models built locally: for tests, benchmarks and the untrained demo model.

They have the real architectures (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``,
transformers ``CLIPTextModel``/``CLIPTextModelWithProjection``) at a few hundred thousand
parameters, so every code path that touches real SD 1.x / 2.x / SDXL models runs in seconds
on a CPU. Head counts follow the rules single-file loading infers for real models
(SD 1.x: 8 heads; SD 2.x and SDXL: 64-wide heads, at least one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .families import Family, default_scheduler_config
from .kolors import load_chatglm_tokenizer
from .tokenizer import build_vocab, load_tokenizer, write_tokenizer

TINY_WORDS = (
    "a photo of the an in on with and style painting drawing picture art red green blue yellow white black "
    "purple orange pink gray brown circle square triangle star dog cat person man woman house tree car sky "
    "background shape sks small big bright dark striped dotted plain high quality low blurry ugly detailed"
).split()


def _heads(channels: int, family: Family) -> int:
    return 8 if family is Family.SD1 else max(1, channels // 64)


def unet_config(family: Family) -> dict:
    family = Family(family)
    ch = (32, 64)
    if family is Family.SDXL:
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=ch,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=tuple(_heads(c, family) for c in ch),
            cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
        )
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
        attention_head_dim=8 if family is Family.SD1 else tuple(_heads(c, family) for c in ch),
        use_linear_projection=family is Family.SD2,
        upcast_attention=family is Family.SD2,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=64,
    )


def text_config(vocab_size: int, bos: int, eos: int, pad: int, hidden: int = 32, projection: int | None = None,
                act: str = "quick_gelu") -> dict:
    """CLIP text config; OpenAI CLIP-L uses quick_gelu, the OpenCLIP encoders (SD 2.x, SDXL bigG) gelu."""
    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, hidden_act=act,
    )
    if projection is not None:
        cfg["projection_dim"] = projection
    return cfg


def scheduler_config(family: Family) -> dict:
    """The SD noise schedule (as for real models); the tiny SD 2.x model is a v-prediction model."""

    family = Family(family)
    return default_scheduler_config(family, "v_prediction" if family is Family.SD2 else "epsilon")


def build_tiny_pipeline_folder(folder: str | os.PathLike, family: Family | str = Family.SD1, seed: int = 0,
                               words: tuple[str, ...] = TINY_WORDS) -> Path:
    """Create a tiny randomly initialised model of ``family`` as a diffusers folder and return its path.

    Deterministic: the same ``seed`` gives bit-identical weights.
    """
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    family = Family(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    write_tokenizer(folder / "tokenizer", vocab, merges, pad_token="!" if family is Family.SD2 else "<|endoftext|>")
    tok = load_tokenizer(folder / "tokenizer")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    index: dict = {"_class_name": "StableDiffusionXLPipeline" if family is Family.SDXL else "StableDiffusionPipeline",
                   "_diffusers_version": "0.42.1"}

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config())
    if family is Family.SDXL:
        vae.register_to_config(scaling_factor=0.13025)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]

    torch.manual_seed(seed + 2)
    if family is Family.SDXL:
        te1 = CLIPTextModel(CLIPTextConfig(**text_config(len(vocab), bos, eos, eos, hidden=32)))
        write_tokenizer(folder / "tokenizer_2", vocab, merges, pad_token="!")
        torch.manual_seed(seed + 3)
        te2_config = text_config(len(vocab), bos, eos, 0, hidden=32, projection=32, act="gelu")
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
        te1.save_pretrained(folder / "text_encoder")
        te2.save_pretrained(folder / "text_encoder_2")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = False
    else:
        pad = eos if family is Family.SD1 else 0
        act = "quick_gelu" if family is Family.SD1 else "gelu"
        te = CLIPTextModel(CLIPTextConfig(**text_config(len(vocab), bos, eos, pad, hidden=32, act=act)))
        te.save_pretrained(folder / "text_encoder")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(family), indent=1))
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


# ---------------------------------------------------------------------------------------------- Kolors
TINY_KOLORS_SENTENCES = (
    "a photo of a dog", "一只狗的照片",
    "a red star on a black background", "黑色背景上的红色星星",
    "high quality, detailed", "高质量，细节丰富",
    "a sks shape", "蓝色的圆形",
    "a painting of a cat in the style of", "一幅猫的画",
    "green triangle on white", "白色背景上的绿色三角形",
    "blurry, ugly, low quality", "模糊，丑陋，低质量",
)


def _chatglm_config(vocab_size: int, hidden: int = 32):
    """A two-layer ChatGLM3 (RMSNorm, multi-query attention, rotary positions, 256 positions as Kolors uses)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig  # noqa: PLC0415

    # original_rope=True: ChatGLMConfig's constructor fails without it.
    return ChatGLMConfig(num_layers=2, padded_vocab_size=vocab_size, hidden_size=hidden, ffn_hidden_size=hidden * 2,
                         kv_channels=hidden // 2, num_attention_heads=2, seq_length=256, multi_query_attention=True,
                         multi_query_group_num=1, add_qkv_bias=True, original_rope=True, torch_dtype="float32")


def build_tiny_kolors_folder(folder: str | os.PathLike, seed: int = 0,
                             sentences: tuple[str, ...] = TINY_KOLORS_SENTENCES) -> Path:
    """A tiny randomly initialised Kolors in the diffusers layout (``KolorsPipeline``'s folder): a SentencePiece
    tokenizer trained on ``sentences`` (with byte fallback, so any text tokenizes), a two-layer ChatGLM3, the tiny
    SDXL UNet with Kolors' text projection (``encoder_hid_proj``) and pooled-width added conditioning, the tiny
    VAE and Kolors' noise schedule. Deterministic in ``seed``. Needs ``sentencepiece``."""
    import io  # noqa: PLC0415

    import sentencepiece as spm  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel  # noqa: PLC0415

    folder = Path(folder)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 4), model_writer=model, vocab_size=400,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2, seed_sentencepiece_size=1000)
    (folder / "tokenizer" / "tokenizer.model").write_bytes(model.getvalue())
    tok = load_chatglm_tokenizer(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer")
    vocab = -(-len(tok) // 16) * 16  # ChatGLM pads its vocabulary to a round size (65024 for the real one)

    hidden = 32
    torch.manual_seed(seed + 2)
    te = ChatGLMModel(_chatglm_config(vocab, hidden), empty_init=False)
    with torch.no_grad():  # RMSNorm weights start as torch.empty and its _init_weights does nothing
        for name, p in te.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.ones_like(p) if name.endswith("layernorm.weight") else torch.zeros_like(p))
            else:
                p.normal_(0.0, 0.02 if "word_embeddings" not in name else 1.0)
    te.save_pretrained(folder / "text_encoder")

    cfg = unet_config(Family.SDXL)
    cfg.update(encoder_hid_dim_type="text_proj", encoder_hid_dim=hidden,
               projection_class_embeddings_input_dim=hidden + 6 * cfg["addition_time_embed_dim"])
    torch.manual_seed(seed)
    UNet2DConditionModel(**cfg).save_pretrained(folder / "unet")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config())
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(Family.KOLORS), indent=1))
    index = {"_class_name": "KolorsPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": False,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["kolors", "ChatGLMModel"],
             "tokenizer": ["kolors", "ChatGLMTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
