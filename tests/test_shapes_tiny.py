"""shapes-tiny: the shipped pretrained model is the default, knows its world, and its training script is
reproducible; the Image Grid node."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.loading import SHAPES_FOLDER, SHAPES_NAME, available_models
from comfy_finetune.nodes.generation import LoadBase
from comfy_finetune.nodes.images import ImageGrid
from comfy_finetune.shapes import train_base
from comfy_finetune.shapes import world as W

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return LoadBase().run(SHAPES_NAME)[0]


def test_shapes_tiny_ships_and_is_the_default():
    assert (SHAPES_FOLDER / "model_index.json").is_file()
    weights = sorted(p.relative_to(SHAPES_FOLDER).as_posix() for p in SHAPES_FOLDER.rglob("*.safetensors"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    assert sum(p.stat().st_size for p in SHAPES_FOLDER.rglob("*")) < 16 * 2 ** 20  # a few MB
    assert not list(SHAPES_FOLDER.rglob("*.bin")) and not list(SHAPES_FOLDER.rglob("*.pt"))  # no pickles
    spec = LoadBase.INPUT_TYPES()["required"]["ckpt_name"]
    assert spec[1]["default"] == SHAPES_NAME and available_models()[0] == SHAPES_NAME


def test_shapes_tiny_is_sd1_with_world_tokenizer(pipe):
    base = pipe.base
    assert base.family.value == "sd1" and base.prediction_type == "epsilon"
    assert base.vae_scale_factor == 4 and base.unet.config.sample_size == 16
    tok = base.tokenizers[0]
    for word in [*W.SHAPES, *W.COLORS, *W.BACKGROUNDS, "shape", "sks", "background"]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word  # whole-word tokens
    metrics = json.loads((SHAPES_FOLDER / "metrics.json").read_text())
    assert metrics["model"] == "shapes-tiny"
    from comfy_finetune.shapes.judge import world_fingerprint

    assert metrics["world"] == world_fingerprint()  # trained on the world this pack renders


def test_shapes_tiny_draws_what_prompts_name(pipe):
    """Judge accuracy on a spread of the world's training prompts, far above chance (chance: shape 1 in 7,
    colour 1 in 8, all three 1 in 224). The shipped model's full figures are in its metrics.json."""
    specs = W.training_specs()[::3]  # 34 prompts across shapes, colours and backgrounds
    acc = train_base.evaluate_base(pipe, per_spec=1, steps=20, specs=specs)
    assert acc["n"] == len(specs)
    # shipped: 98 / 100 / 100 % (all three 98 %) on the 101 training prompts; margins for other CPUs' rounding
    assert acc["shape"] >= 0.85 and acc["color"] >= 0.9 and acc["background"] >= 0.95, acc
    assert acc["all"] >= 0.8, acc


def test_missing_builtin_model_is_a_clear_error(monkeypatch, tmp_path):
    from comfy_finetune.core import loading

    monkeypatch.setattr(loading, "SHAPES_FOLDER", tmp_path / "nope")
    with pytest.raises(FinetuneError) as err:
        LoadBase().run(SHAPES_NAME, "fp32", "cpu")
    assert err.value.node == "LoadBase" and err.value.input == "ckpt_name" and "train_base" in err.value.fix


def test_training_script_is_reproducible(tmp_path):
    """Same seed -> bit-identical weights; another seed -> different weights (a smoke-sized run)."""
    def run(seed: int, name: str):
        args = ["--out", str(tmp_path / name), "--scale", "0.002", "--eval-per-spec", "0", "--eval-every", "0",
                "--threads", "1", "--seed", str(seed)]
        try:
            assert train_base.main(args) == 0
        finally:
            torch.set_num_threads(1)
        folder = tmp_path / name
        return {part: load_file(folder / part / name_) for part, name_ in (
            ("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
            ("text_encoder", "model.safetensors"))}

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert not all(torch.equal(a["unet"][k], c["unet"][k]) for k in a["unet"])
    assert train_base.main(["--out", str(tmp_path / "a"), "--scale", "0.004"]) == 2  # never overwritten silently


def test_caption_variants_cover_partial_prompts():
    spec = W.Spec("triangle", "orange", "black")
    seen = {train_base.caption_variant(spec, r / 100, r2 / 10) for r in range(100) for r2 in range(10)}
    assert spec.caption() in seen and "" in seen and "an orange triangle" in seen
    assert "a triangle on a black background" in seen and "an orange shape on a black background" in seen


def test_image_grid_node():
    a = torch.zeros(2, 16, 16, 3)
    b = torch.ones(3, 16, 16, 3)
    (grid,) = ImageGrid().run(images_1=a, label_1="before", images_2=b, label_2="after")
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    h, w = grid.shape[1:3]
    assert h >= 2 * 16 and w >= 3 * 16  # two rows, three columns
    (one,) = ImageGrid().run(images_1=a)
    assert one.shape[1] < h
    assert torch.equal(a, torch.zeros(2, 16, 16, 3)) and torch.equal(b, torch.ones(3, 16, 16, 3))  # inputs intact
    with pytest.raises(FinetuneError) as err:
        ImageGrid().run(images_1=a, images_2=torch.zeros(16, 16))
    assert err.value.node == "FinetuneImageGrid" and err.value.input == "images_2"
