"""The scoring nodes (nodes/scoring.py) on tiny models built here: Load Feature Model, the scorer nodes, Combine
Scorers, Evaluate Images (FD/KD on DINOv2 / CLIP features, FID/KID/IS with a random-init FID Inception) and a
trainer's scorer input end to end.

The feature models and the Inception network have random weights: what is checked is what the nodes compute from
them (the figures equal the metrics on the same features, identical sets give ~0, another set more), not absolute
values. The shapes judge is the shipped one, on images rendered by the shapes world.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.tokenizer import build_vocab, write_tokenizer
from comfy_finetune.nodes.scoring import (
    CombineScorers,
    EvaluateImages,
    LoadFeatureModel,
    ScoreHeldOutLoss,
    ScoreWithFeatures,
    ScoreWithJudge,
)
from comfy_finetune.scoring import features
from comfy_finetune.scoring import metrics as M
from comfy_finetune.scoring.inception import FIDInception, inception_features, load_fid_inception
from comfy_finetune.scoring.scorers import Combined, FeatureScorer, JudgeScorer, Probe, ValidationLossScorer
from comfy_finetune.shapes.world import Spec, render_batch

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a photo of the sks shape red green blue circle star square on black white background".split()
INCEPTION = "pt_inception-test.pth"
WRONG_INCEPTION = "inception-x.safetensors"
FEATURE_NAMES = ["clip-tiny", "clip-vision-tiny", "cv-file.safetensors", "dinov2-tiny"]


# ---------------------------------------------------------------------------------------------- helpers
def _raises(fn, node: str, input: str, match: str = "") -> str:
    """Call ``fn``; it must raise a FinetuneError naming ``node`` and ``input``, with a fix (and ``match``)."""
    with pytest.raises(FinetuneError) as err:
        fn()
    msg = str(err.value)
    assert msg.startswith(f"[{node}]") and f"input '{input}'" in msg and "Fix:" in msg, msg
    assert match in msg, msg
    return msg


def _shapes(*specs: Spec, seed: int = 0) -> torch.Tensor:
    """IMAGE [B, 64, 64, 3] of the shapes world, one seed per image."""
    return torch.from_numpy(render_batch(list(specs), [seed + 17 * i for i in range(len(specs))]))


GREEN_STAR_BLACK = Spec("star", "green", "black")
GREEN_STAR_WHITE = Spec("star", "green", "white")
RED_CIRCLE_WHITE = Spec("circle", "red", "white")
BLUE_SQUARE_GRAY = Spec("square", "blue", "gray")


def _judge(measure="fidelity", target="green star", prompts="a sks shape on a black background", samples=2,
           every=0, patience=0, seed=0):
    return ScoreWithJudge().run(measure=measure, target=target, prompts=prompts, samples=samples, every=every,
                                patience=patience, seed=seed)[0]


def _feature_scorer(fm, measure="subject_similarity", prompts="a sks shape", samples=2, references=None):
    return ScoreWithFeatures().run(features=fm, measure=measure, prompts=prompts, samples=samples, every=0,
                                   patience=0, seed=0, references=references)[0]


@contextmanager
def _models_dir(root: Path):
    """``root`` as the host's models folder for a while; the session's folder is restored after."""
    saved = host._settings.models_dir
    host.configure(models_dir=root)
    try:
        yield root
    finally:
        host._settings.models_dir = saved


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# ---------------------------------------------------------------------------------------------- tiny models
def _fid_state_dict() -> dict:
    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():  # keep activations O(1) through 94 layers (the default init shrinks them to ~0)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A models folder: tiny CLIP (with tokenizer) and DINOv2 folders in feature_models, a CLIP vision folder and
    single file in clip_vision, a random-init FID Inception and a CLIP file misnamed as Inception weights."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    root = tmp_path_factory.mktemp("scoring_models")
    fm_dir, cv_dir = root / "feature_models", root / "clip_vision"
    vocab, merges = build_vocab(WORDS)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(fm_dir / "clip-tiny")
    write_tokenizer(fm_dir / "clip-tiny", vocab, merges)

    torch.manual_seed(1)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=32,
        patch_size=8, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5))
    vision.save_pretrained(cv_dir / "clip-vision-tiny")
    shutil.copy(cv_dir / "clip-vision-tiny" / "model.safetensors", cv_dir / "cv-file.safetensors")

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                             patch_size=8)).save_pretrained(fm_dir / "dinov2-tiny")

    torch.save(_fid_state_dict(), fm_dir / INCEPTION)
    shutil.copy(fm_dir / "clip-tiny" / "model.safetensors", fm_dir / WRONG_INCEPTION)
    return root


@pytest.fixture
def models(models_dir, tiny_root):
    """tiny_root as the host's models folder for one test (after the session's folder was set up)."""
    with _models_dir(tiny_root):
        yield tiny_root
    features.clear_cache()


@pytest.fixture(scope="module")
def fms(tiny_root) -> dict:
    """name -> FeatureModel, loaded through the node by absolute path (headless use)."""
    out = {name: LoadFeatureModel().run(model_name=str(path))[0]
           for name, path in (("clip", tiny_root / "feature_models" / "clip-tiny"),
                              ("dinov2", tiny_root / "feature_models" / "dinov2-tiny"),
                              ("clip_vision", tiny_root / "clip_vision" / "clip-vision-tiny"))}
    yield out
    features.clear_cache()


# ---------------------------------------------------------------------------------------------- Load Feature Model
def test_load_feature_model_lists_and_loads_the_models_of_the_models_folder(models):
    choices = LoadFeatureModel.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == FEATURE_NAMES  # folders once (not their weights file), single files in clip_vision
    loaded = {name: LoadFeatureModel().run(model_name=name)[0] for name in choices}
    kinds = {name: (fm.kind, fm.has_text, fm.dim) for name, fm in loaded.items()}
    assert kinds == {"clip-tiny": ("clip", True, 16), "clip-vision-tiny": ("clip_vision", False, 16),
                     "cv-file.safetensors": ("clip_vision", False, 16), "dinov2-tiny": ("dinov2", False, 32)}
    images = _shapes(GREEN_STAR_BLACK, RED_CIRCLE_WHITE)
    # the single file and the folder it was copied from are the same model
    torch.testing.assert_close(loaded["cv-file.safetensors"].image_features(images),
                               loaded["clip-vision-tiny"].image_features(images), atol=1e-5, rtol=1e-5)
    assert loaded["clip-tiny"].text_features(["a red circle"]).shape == (1, 16)


def test_load_feature_model_refuses_a_missing_name(models):
    for name in ("no-such-model", "../clip_vision/cv-file.safetensors", "none"):
        _raises(lambda n=name: LoadFeatureModel().run(model_name=n), "FinetuneLoadFeatureModel", "model_name",
                "was not found")
    assert LoadFeatureModel.IS_CHANGED("no-such-model") == ""


def test_load_feature_model_is_changed_follows_a_weights_file(models_dir, tiny_root, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_root / "clip_vision", root / "clip_vision")
    with _models_dir(root):
        before = LoadFeatureModel.IS_CHANGED("cv-file.safetensors")
        assert before and LoadFeatureModel.IS_CHANGED("cv-file.safetensors") == before  # stable while unchanged
        _bump_mtime(root / "clip_vision" / "cv-file.safetensors")
        assert LoadFeatureModel.IS_CHANGED("cv-file.safetensors") != before
        shutil.copy(tiny_root / "feature_models" / WRONG_INCEPTION, root / "clip_vision" / "cv-file.safetensors")
        assert LoadFeatureModel.IS_CHANGED("cv-file.safetensors") != before


def test_load_feature_model_is_changed_follows_the_weights_in_a_folder(models_dir, tiny_root, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_root / "clip_vision", root / "clip_vision")
    with _models_dir(root):
        before = LoadFeatureModel.IS_CHANGED("clip-vision-tiny")
        assert before and LoadFeatureModel.IS_CHANGED("clip-vision-tiny") == before
        # new weights written over the folder's weights file in place (same name, same size), as `cp` does
        weights = root / "clip_vision" / "clip-vision-tiny" / "model.safetensors"
        size = weights.stat().st_size
        sd = load_file(weights)
        weights.write_bytes(save({k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()},
                                 metadata={"format": "pt"}))
        _bump_mtime(weights)
        assert weights.stat().st_size == size
        assert LoadFeatureModel.IS_CHANGED("clip-vision-tiny") != before


# ---------------------------------------------------------------------------------------------- Evaluate Images
@pytest.mark.parametrize("kind,label", [("dinov2", "DINOv2"), ("clip", "CLIP"), ("clip_vision", "CLIP")])
def test_evaluate_images_frechet_and_kernel_distances_on_features(fms, kind, label):
    fm = fms[kind]
    images = _shapes(GREEN_STAR_BLACK, GREEN_STAR_WHITE, RED_CIRCLE_WHITE, BLUE_SQUARE_GRAY)
    fid, kid, iscore, value, report, table = EvaluateImages().run(images=images, references=images.clone(),
                                                                   features=fm)
    feats = fm.image_features(images)
    scale = float(feats.var(0).sum())
    assert scale > 0
    assert math.isfinite(fid) and abs(fid) < 1e-4 * scale  # the same set: FD ~ 0 (round-off only)
    # KID is the unbiased MMD^2: a few identical samples give a negative figure, not 0
    assert kid == pytest.approx(M.kernel_inception_distance(feats, fm.image_features(images), subset_size=1000)[0],
                                rel=1e-6, abs=1e-9)
    assert math.isnan(iscore) and math.isnan(value)  # no Inception weights, no scorer
    assert f"FD-{label}:" in report and f"KD-{label}:" in report
    assert f"{label}{'-I' if label == 'CLIP' else ''} similarity: 1.0000" not in report  # every pair, not diagonal
    assert table.ndim == 4 and table.shape[0] == 1 and table.shape[-1] == 3 and table.shape[1] > 20
    assert table.dtype == torch.float32 and 0 <= float(table.min()) and float(table.max()) <= 1

    shifted = images[..., [2, 0, 1]]  # the same shapes in other colours
    fid2, kid2, _, _, report2, _ = EvaluateImages().run(images=shifted, references=images, features=fm,
                                                        kid_subset_size=4)
    want = M.frechet_distance(fm.image_features(shifted), feats)  # "fid" is the feature FD without Inception
    assert fid2 == pytest.approx(want, rel=1e-6)
    assert fid2 > 0.02 * scale and fid2 > 1000 * abs(fid)
    assert kid2 == pytest.approx(M.kernel_inception_distance(fm.image_features(shifted), feats, subset_size=4)[0],
                                 rel=1e-6, abs=1e-9)
    assert f"FD-{label}: {fid2:.4g}" in report2


def test_evaluate_images_needs_something_to_compute(fms):
    images = _shapes(GREEN_STAR_BLACK, RED_CIRCLE_WHITE)
    _raises(lambda: EvaluateImages().run(images=images, features=fms["dinov2"]), "FinetuneEvaluateImages",
            "references", "nothing to compute")
    _raises(lambda: EvaluateImages().run(images=images[:1], references=images, features=fms["dinov2"]),
            "FinetuneEvaluateImages", "images", "at least 2")


def test_subject_similarity_is_higher_for_the_subject_than_for_other_images(fms):
    refs = _shapes(GREEN_STAR_BLACK, GREEN_STAR_BLACK, GREEN_STAR_BLACK, GREEN_STAR_BLACK, seed=3)
    other = _shapes(RED_CIRCLE_WHITE, BLUE_SQUARE_GRAY, RED_CIRCLE_WHITE, BLUE_SQUARE_GRAY, seed=5)
    for kind in ("dinov2", "clip"):
        fm = fms[kind]
        scorer = _feature_scorer(fm, samples=4)
        same = EvaluateImages().run(images=refs, references=refs, scorer=scorer)
        diff = EvaluateImages().run(images=other, references=refs, scorer=scorer)
        assert same[3] > diff[3] + 1e-3, (kind, same[3], diff[3])
        # the mean cosine between every sample and every reference
        a = torch.nn.functional.normalize(fm.image_features(other), dim=-1)
        b = torch.nn.functional.normalize(fm.image_features(refs), dim=-1)
        assert diff[3] == pytest.approx(float((a @ b.T).mean()), abs=1e-5)
        name = "DINO subject" if kind == "dinov2" else "CLIP-I subject"
        assert f"{name}: {diff[3]:.4g}" in diff[4] and "score:" in diff[4]
        assert math.isnan(same[0])  # a scorer alone computes no FD


def test_subject_similarity_with_references_on_the_scorer_node(fms):
    refs = _shapes(GREEN_STAR_BLACK, GREEN_STAR_BLACK, seed=3)
    other = _shapes(RED_CIRCLE_WHITE, BLUE_SQUARE_GRAY)
    scorer = _feature_scorer(fms["dinov2"], references=refs)
    assert scorer.references is refs
    with_node_refs = EvaluateImages().run(images=other, scorer=scorer)[3]
    with_eval_refs = EvaluateImages().run(images=other, references=refs, scorer=_feature_scorer(fms["dinov2"]))[3]
    assert with_node_refs == pytest.approx(with_eval_refs, abs=1e-6)


def test_prompt_alignment_with_a_full_clip(fms):
    fm = fms["clip"]
    prompts = ["a red circle on a white background", "a green star on a black background"]
    scorer = _feature_scorer(fm, measure="prompt_alignment", prompts="\n".join(prompts))
    assert [p.prompt for p in scorer.probes()] == prompts
    images = _shapes(RED_CIRCLE_WHITE, RED_CIRCLE_WHITE, GREEN_STAR_BLACK, GREEN_STAR_BLACK)
    _, _, _, value, report, _ = EvaluateImages().run(images=images, scorer=scorer)
    text = torch.nn.functional.normalize(fm.text_features(prompts), dim=-1)
    feats = torch.nn.functional.normalize(fm.image_features(images), dim=-1)
    want = (float((feats[:2] @ text[0]).mean()) + float((feats[2:] @ text[1]).mean())) / 2  # first half: prompt 1
    assert value == pytest.approx(want, abs=1e-5)
    assert -1 <= value <= 1 and "CLIP-T prompt" in report


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision"])
def test_prompt_alignment_needs_a_clip_with_its_text_model(fms, kind):
    msg = _raises(lambda: _feature_scorer(fms[kind], measure="prompt_alignment"), "FinetuneScoreWithFeatures",
                  "features", "prompt alignment")
    assert "full CLIP folder" in msg


def test_subject_similarity_without_references_names_them(fms):
    scorer = _feature_scorer(fms["dinov2"])  # no references yet: a trainer would give its training images
    images = _shapes(GREEN_STAR_BLACK, GREEN_STAR_WHITE)
    _raises(lambda: EvaluateImages().run(images=images, scorer=scorer), "FinetuneScoreWithFeatures", "references",
            "there are none")


def test_images_must_split_evenly_over_the_prompts(fms):
    scorer = _feature_scorer(fms["dinov2"], prompts="a sks shape\na sks shape on a black background")
    images = _shapes(GREEN_STAR_BLACK, GREEN_STAR_WHITE, RED_CIRCLE_WHITE)
    _raises(lambda: EvaluateImages().run(images=images, references=images, scorer=scorer), "FinetuneEvaluateImages",
            "images", "3 images cannot be split evenly over the scorer's 2 prompt(s)")


# ---------------------------------------------------------------------------------------------- FID Inception
def test_fid_kid_and_is_with_the_inception_weights(models, fms):
    choices = EvaluateImages.INPUT_TYPES()["optional"]["inception"][0]
    assert choices[0] == "none" and INCEPTION in choices and WRONG_INCEPTION in choices
    images = _shapes(GREEN_STAR_BLACK, RED_CIRCLE_WHITE)
    refs = _shapes(BLUE_SQUARE_GRAY, GREEN_STAR_WHITE, seed=9)
    fid, kid, iscore, value, report, table = EvaluateImages().run(images=images, references=refs,
                                                                   features=fms["dinov2"], inception=INCEPTION)
    assert all(math.isfinite(x) for x in (fid, kid, iscore)) and math.isnan(value)
    assert iscore >= 1 - 1e-6  # exp of a mean KL divergence
    net = load_fid_inception(models / "feature_models" / INCEPTION)
    pool, _ = inception_features(net, images)
    ref_pool, _ = inception_features(net, refs)
    assert pool.std() > 1e-3  # a useful init: the features are not ~0
    # two samples a side: covariances u u^T and v v^T (u = difference / sqrt 2), so tr sqrt(S_a S_b) = |u.v|
    a, b = pool.double(), ref_pool.double()
    u, v = (a[0] - a[1]) / math.sqrt(2), (b[0] - b[1]) / math.sqrt(2)
    want = float((a.mean(0) - b.mean(0)).square().sum() + u.square().sum() + v.square().sum() - 2 * (u @ v).abs())
    assert fid == pytest.approx(want, rel=1e-4) and fid > 0  # Inception's FID wins over the feature FD
    fd = M.frechet_distance(fms["dinov2"].image_features(images), fms["dinov2"].image_features(refs))
    assert fid != pytest.approx(fd, rel=1e-3)
    for row in ("IS:", "FID:", "KID:", "FD-DINOv2:"):
        assert row in report, report
    assert table.shape[0] == 1 and table.shape[-1] == 3


def test_inception_score_alone_and_one_image_against_references(models):
    images = _shapes(GREEN_STAR_BLACK, RED_CIRCLE_WHITE)
    fid, kid, iscore, _, report, _ = EvaluateImages().run(images=images, inception=INCEPTION)
    assert math.isfinite(iscore) and math.isnan(fid) and math.isnan(kid)  # no references: IS only
    assert report.startswith("IS:")
    _raises(lambda: EvaluateImages().run(images=images[:1], references=images, inception=INCEPTION),
            "FinetuneEvaluateImages", "images", "at least 2")


@pytest.mark.parametrize("name,match", [(WRONG_INCEPTION, "not the FID Inception v3 weights file"),
                                        ("pt_inception-missing.pth", "is not in models/feature_models"),
                                        ("../clip_vision/cv-file.safetensors", "is not in models/feature_models")])
def test_wrong_inception_files_name_the_input(models, name, match):
    images = _shapes(GREEN_STAR_BLACK, RED_CIRCLE_WHITE)
    msg = _raises(lambda: EvaluateImages().run(images=images, references=images, inception=name),
                  "FinetuneEvaluateImages", "inception", match)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg


# ---------------------------------------------------------------------------------------------- the shapes judge
def test_score_with_judge_samples_the_prompt_lines():
    scorer = _judge(prompts="a sks shape\n\n  a sks shape on a black background  \n", samples=3, every=5,
                    patience=2, seed=7)
    assert isinstance(scorer, JudgeScorer)
    assert scorer.probes() == (Probe("a sks shape", 3, 7), Probe("a sks shape on a black background", 3, 1007))
    assert (scorer.interval(1000), scorer.patience, scorer.holdout) == (5, 2, 0)
    assert scorer.describe() == "judge fidelity on 2 prompt(s) x 3"
    assert _judge(every=0).every == 0  # 0: the trainer chooses when to score


@pytest.mark.parametrize("measure,target,prompts,input", [
    ("fidelity", "", "a photo of sks dog", "target"),
    ("fidelity", "sks", "a sks shape\na photo of sks dog", "prompts"),
    ("class_preservation", "", "a photo of a dog", "prompts"),  # the target is ignored: the prompt counts
    ("class_preservation", "green star", "a photo of a dog", "prompts"),
    ("fidelity", "green star", "  \n ", "prompts"),
    ("accuracy", "green star", "a sks shape", "measure"),
])
def test_score_with_judge_refuses_what_the_judge_cannot_check(measure, target, prompts, input):
    _raises(lambda: _judge(measure=measure, target=target, prompts=prompts), "FinetuneScoreWithJudge", input)


def test_judge_fidelity_through_evaluate_images():
    scorer = _judge(target="green star", prompts="a sks shape on a black background\na sks shape")
    matching = _shapes(GREEN_STAR_BLACK, GREEN_STAR_BLACK, GREEN_STAR_WHITE, GREEN_STAR_BLACK)
    assert EvaluateImages().run(images=matching, scorer=scorer)[3] == 1.0
    # prompt 1: a green star on white (wrong background), one on black; prompt 2: one right, a red star
    half = _shapes(GREEN_STAR_WHITE, GREEN_STAR_BLACK, GREEN_STAR_WHITE, Spec("star", "red", "black"))
    value = EvaluateImages().run(images=half, scorer=scorer)[3]
    assert value == pytest.approx(0.5)
    none = _shapes(RED_CIRCLE_WHITE, BLUE_SQUARE_GRAY, RED_CIRCLE_WHITE, BLUE_SQUARE_GRAY)
    _, _, _, value, report, _ = EvaluateImages().run(images=none, scorer=scorer)
    assert value == 0.0 and "judge fidelity: 0" in report


# ---------------------------------------------------------------------------------------------- Combine Scorers
def _combine(a, b=None, wa=1.0, wb=1.0, fa=0.0, fb=0.0, every=3, patience=1):
    return CombineScorers().run(scorer_a=a, weight_a=wa, floor_a=fa, every=every, patience=patience, scorer_b=b,
                                weight_b=wb, floor_b=fb)[0]


def test_combine_scorers_refuses_all_zero_weights():
    a, b = _judge(), _judge(target="red circle", prompts="a sks shape on a white background")
    _raises(lambda: _combine(a, b, wa=0.0, wb=0.0), "FinetuneCombineScorers", "weight_a", "every weight is 0")
    _raises(lambda: _combine(a, wa=0.0, wb=5.0), "FinetuneCombineScorers", "weight_a")  # b is not connected


def test_combine_scorers_parts_floors_and_the_weighted_mean():
    a = _judge(target="green star", prompts="a sks shape on a black background", samples=2)
    b = _judge(target="red circle", prompts="a sks shape on a white background", samples=2)
    combined = _combine(a, b, wa=1.0, wb=3.0, fa=0.0, fb=0.25, every=3, patience=1)
    assert isinstance(combined, Combined)
    assert [(p.scorer, p.weight, p.floor) for p in combined.parts] == [(a, 1.0, None), (b, 3.0, 0.25)]
    assert (combined.interval(100), combined.patience) == (3, 1)
    assert [p.prompt for p in combined.probes()] == ["a sks shape on a black background",
                                                     "a sks shape on a white background"]
    imgs_a = _shapes(GREEN_STAR_BLACK, RED_CIRCLE_WHITE)  # a: 1 of 2
    imgs_b = _shapes(RED_CIRCLE_WHITE, RED_CIRCLE_WHITE)  # b: 2 of 2
    va = EvaluateImages().run(images=imgs_a, scorer=a)[3]
    vb = EvaluateImages().run(images=imgs_b, scorer=b)[3]
    assert (va, vb) == (0.5, 1.0)
    _, _, _, value, report, _ = EvaluateImages().run(images=torch.cat([imgs_a, imgs_b]), scorer=combined)
    assert value == pytest.approx((1.0 * va + 3.0 * vb) / 4.0)
    assert "judge fidelity: 0.5" in report and "judge fidelity 2: 1" in report  # each part's own figure
    assert "(>= 0.25)" in report


# ---------------------------------------------------------------------------------------------- held-out loss
def test_score_held_out_loss_needs_something_to_hold_out():
    _raises(lambda: ScoreHeldOutLoss().run(holdout=0, every=2, patience=0), "FinetuneScoreHeldOutLoss", "holdout",
            "nothing to hold out")
    scorer = ScoreHeldOutLoss().run(holdout=2, every=4, patience=3)[0]
    assert isinstance(scorer, ValidationLossScorer)
    assert (scorer.holdout, scorer.heldout_set, scorer.interval(100), scorer.patience) == (2, None, 4, 3)
    assert scorer.probes() == ()  # samples nothing


def test_score_held_out_loss_with_a_validation_set(red_circle):
    scorer = ScoreHeldOutLoss().run(holdout=0, every=0, patience=0, dataset=red_circle)[0]
    assert scorer.holdout == 0 and scorer.heldout_set is red_circle  # the training set stays whole


# ---------------------------------------------------------------------------------------------- a trainer's scorer
@pytest.fixture(scope="module")
def red_circle(models_dir):
    from comfy_finetune.nodes.data import find_dataset_folder
    from comfy_finetune.training.data import prepare, read_folder

    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


TRAIN = dict(rank=2, alpha=2.0, targets="attention", train_text_encoder=False, text_learning_rate=5e-5, steps=6,
             learning_rate=1e-4, batch_size=1, grad_accum=1, lr_schedule="constant", warmup_steps=0,
             optimizer="adamw", precision="fp32", gradient_checkpointing=False, min_snr_gamma=0.0, noise_offset=0.0,
             seed=4242, recipe="custom")


def test_train_lora_with_a_held_out_loss_scorer(tiny_handles, red_circle, monkeypatch, caplog):
    from comfy_finetune.nodes.training import TrainLoRA
    from comfy_finetune.training import frame
    from comfy_finetune.training.data import TrainingSet
    from comfy_finetune.training.plots import SCORE_PANEL_RATIO

    pipe = tiny_handles["sd1"]
    names = [ex.name for ex in red_circle.examples]
    assert len(names) == 6
    trained_on, scored_on = [], []
    real_batches, real_loss = TrainingSet.batches, frame.evaluation_loss

    def batches(self, *args, **kwargs):
        trained_on.append([ex.name for ex in self.examples])
        return real_batches(self, *args, **kwargs)

    def evaluation_loss(handle, dataset, **kwargs):
        scored_on.append([ex.name for ex in dataset.examples])
        return real_loss(handle, dataset, **kwargs)

    monkeypatch.setattr(TrainingSet, "batches", batches)
    monkeypatch.setattr(frame, "evaluation_loss", evaluation_loss)

    plain = TrainLoRA().run(pipe=pipe, dataset=red_circle, **TRAIN)
    assert trained_on == [names] and scored_on == []
    trained_on.clear()
    scorer = ScoreHeldOutLoss().run(holdout=1, every=2, patience=0)[0]
    with caplog.at_level(logging.INFO, logger="comfy_finetune"):
        lora, _, plot, _ = TrainLoRA().run(pipe=pipe, dataset=red_circle, scorer=scorer, **TRAIN)
    assert trained_on == [names[:-1]]  # the last image is held out of training ...
    assert scored_on == [names[-1:]] * 4  # ... and scored before training and at steps 2, 4 and 6
    assert f"1 image(s) held out of training for the held-out loss: {names[-1]}" in caplog.text
    assert "held-out loss on 1 training image(s)" in caplog.text
    assert lora.modules
    height = plain[2].shape[1]
    assert plot.shape[0] == 1 and plot.shape[2] == plain[2].shape[2]
    assert plot.shape[1] == height + round(height * SCORE_PANEL_RATIO)  # the score panel under the loss


def test_train_lora_refuses_to_hold_out_every_image(tiny_handles, red_circle):
    from comfy_finetune.nodes.training import TrainLoRA

    scorer = ScoreHeldOutLoss().run(holdout=6, every=2, patience=0)[0]
    _raises(lambda: TrainLoRA().run(pipe=tiny_handles["sd1"], dataset=red_circle, scorer=scorer, **TRAIN),
            "FinetuneTrainLoRA", "scorer", "holds out 6 of the 6 training images")


def test_feature_scorer_is_what_the_node_builds(fms):
    scorer = _feature_scorer(fms["dinov2"], prompts="a sks shape\nsks on a beach", samples=3)
    assert isinstance(scorer, FeatureScorer) and scorer.references is None
    assert scorer.probes() == (Probe("a sks shape", 3, 0), Probe("sks on a beach", 3, 1000))
    assert scorer.describe() == "DINO subject (dinov2-tiny) on 2 prompt(s) x 3"
