"""Prompt encoding: weights, chunking, SDXL dual encoders, embeddings."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_finetune.core.conditioning import encode_prompt, same_length, sdxl_added, stack_conds
from comfy_finetune.core.embeddings import Embedding
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.handle import EmbeddingPatch


def test_shapes_per_family(tiny_handles):
    sd1 = encode_prompt(tiny_handles["sd1"], "a red circle")
    assert sd1.cond.shape == (1, 77, 32) and sd1.pooled is None
    xl = encode_prompt(tiny_handles["sdxl"], "a red circle")
    assert xl.cond.shape == (1, 77, 64)  # CLIP-L 32 + bigG 32 on the channel axis
    assert xl.pooled.shape == (1, 32)


def test_long_prompt_is_chunked(tiny_handles, family):
    long = " ".join(["red circle"] * 60)  # > 75 tokens
    c = encode_prompt(tiny_handles[family], long)
    assert c.cond.shape[1] == 154
    short = encode_prompt(tiny_handles[family], "red circle")
    if c.pooled is not None:  # pooled comes from the first chunk only
        assert c.pooled.shape == short.pooled.shape


def test_weight_one_is_identity_and_weights_interpolate(tiny_handles, family):
    h = tiny_handles[family]
    plain = encode_prompt(h, "a red circle").cond
    same = encode_prompt(h, "a (red:1.0) circle").cond
    assert torch.allclose(plain, same, atol=1e-6)
    up = encode_prompt(h, "a (red:1.5) circle").cond
    assert not torch.allclose(plain, up)
    # ComfyUI rule: z = z_empty + w * (z - z_empty) per token
    empty_tokens = encode_prompt(h, "(a red circle:0.0)").cond
    w2 = encode_prompt(h, "(a red circle:2.0)").cond
    assert torch.allclose(w2, empty_tokens + 2.0 * (plain - empty_tokens), atol=1e-5)


def test_embedding_from_handle_and_file(tiny_handles, models_dir):
    h = tiny_handles["sd1"]
    vec = torch.randn(2, 32)
    emb = Embedding("mytok", {"te1": vec})
    h2 = h.with_patch(EmbeddingPatch(emb))
    with_emb = encode_prompt(h2, "a embedding:mytok circle").cond
    assert not torch.allclose(with_emb, encode_prompt(h, "a circle").cond[:, :77])
    # the same vectors from a file in models/embeddings (A1111 safetensors layout)
    save_file({"emb_params": vec}, str(models_dir / "embeddings" / "filetok.safetensors"))
    from_file = encode_prompt(h, "a embedding:filetok circle").cond
    assert torch.allclose(with_emb, from_file, atol=1e-6)
    # the base handle is untouched: no patch leaks
    assert encode_prompt(h, "a circle").cond.shape == (1, 77, 32)
    assert h.patches == ()


def test_missing_embedding_is_a_clear_error(tiny_handles):
    with pytest.raises(FinetuneError, match=r"embedding:nope was not found"):
        encode_prompt(tiny_handles["sd1"], "a embedding:nope circle")


def test_embedding_of_wrong_width_refused(tiny_handles, models_dir):
    save_file({"emb_params": torch.randn(1, 768)}, str(models_dir / "embeddings" / "sd15tok.safetensors"))
    with pytest.raises(FinetuneError, match=r"size 768.*expects 32"):
        encode_prompt(tiny_handles["sd1"], "embedding:sd15tok")


def test_sdxl_embedding_both_encoders(tiny_handles):
    h = tiny_handles["sdxl"]
    emb = Embedding("xl", {"te1": torch.randn(1, 32), "te2": torch.randn(1, 32)})
    c = encode_prompt(h.with_patch(EmbeddingPatch(emb)), "embedding:xl circle")
    base = encode_prompt(h, "circle")
    assert c.cond.shape == base.cond.shape
    assert not torch.allclose(c.cond[..., :32], base.cond[..., :32])
    assert not torch.allclose(c.cond[..., 32:], base.cond[..., 32:])


def test_a1111_pt_embedding_loads(tiny_handles, models_dir):
    """A1111's .pt layout (string_to_param) through weights-only loading, used as embedding:name."""
    vec = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "a1111tok", "step": 10},
               str(models_dir / "embeddings" / "a1111tok.pt"))
    h = tiny_handles["sd1"]
    from_pt = encode_prompt(h, "a embedding:a1111tok circle").cond
    direct = encode_prompt(h.with_patch(EmbeddingPatch(Embedding("x", {"te1": vec}))), "a embedding:x circle").cond
    assert torch.allclose(from_pt, direct, atol=1e-6)


def test_conds_of_different_lengths_are_repeated_to_a_common_length():
    """ComfyUI's CONDCrossAttn.concat: repeat along the tokens to the least common multiple of the lengths."""
    a, b, c = torch.randn(1, 77, 8), torch.randn(1, 154, 8), torch.randn(1, 231, 8)
    same = same_length([a, b])
    assert [t.shape[1] for t in same] == [154, 154]
    assert torch.equal(same[0], torch.cat([a, a], dim=1)) and torch.equal(same[1], b)
    stacked = stack_conds([a, b, c])
    assert stacked.shape == (3, 462, 8)
    assert torch.equal(stacked[0], a[0].repeat(6, 1)) and torch.equal(stacked[2], c[0].repeat(2, 1))
    assert torch.equal(stack_conds([a, a]), torch.cat([a, a]))


def test_sdxl_added_conditioning():
    pooled = torch.randn(3, 16, dtype=torch.float64)
    added = sdxl_added(pooled, 96, 64, torch.float32, torch.device("cpu"))
    assert added["text_embeds"].dtype == torch.float32 and torch.equal(added["text_embeds"], pooled.float())
    assert added["time_ids"].shape == (3, 6) and added["time_ids"].dtype == torch.float32
    assert added["time_ids"][1].tolist() == [96, 64, 0, 0, 96, 64]  # (orig h, w, crop top, left, target h, w)
