"""Scoring nodes: scorers for the trainers' ``scorer`` input, feature models, and Evaluate Images.

A scorer (``FT_SCORER``) tells a trainer what to measure every N steps; the trainer keeps the best-scoring checkpoint
and returns it (see ``scoring.scorers``). Evaluate Images scores any IMAGE batch: FID / KID / IS with the FID
Inception weights, Frechet and kernel distances on DINO or CLIP features (named after them, e.g. FD-DINOv2), and
any scorer.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import FinetuneError
from ..scoring import features as F
from ..scoring import inception as I
from ..scoring import metrics as M
from ..scoring.scorers import (
    FEATURE_MEASURES,
    JUDGE_MEASURES,
    Combined,
    Evaluation,
    FeatureScorer,
    JudgeScorer,
    Part,
    ValidationLossScorer,
)
from ..training.plots import table_image
from .base import CATEGORY, DATASET, FEATURES, SCORER, FTNode

SCORE_CATEGORY = f"{CATEGORY}/scoring"
NONE = "none"

_EVERY = ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                  "tooltip": "Score every N training steps; 0 = automatic: as often as keeps scoring within about "
                             "15 % of the training time (timed on the first evaluation and steps). The model before "
                             "training and the last step are always scored."})
_PATIENCE = ("INT", {"default": 0, "min": 0, "max": 1000,
                     "tooltip": "Stop training when the score has not improved for this many evaluations; 0 = never."})
_SAMPLES = ("INT", {"default": 4, "min": 1, "max": 64,
                    "tooltip": "Images per prompt at every evaluation (one batch, fixed seeds)."})
_SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                 "tooltip": "Seed of the first prompt's samples (each prompt gets its own, fixed for the run)."})


class ScoreWithJudge(FTNode):
    NODE_ID = "FinetuneScoreWithJudge"
    DISPLAY_NAME = "Scorer: Shapes Judge (Finetune)"
    CATEGORY = SCORE_CATEGORY
    DESCRIPTION = ("Scores samples of the built-in shapes world with the shapes judge, for a trainer's scorer input. "
                   "fidelity: the share of samples showing what the target and each prompt name (target 'green star' "
                   "+ prompt 'a sks shape on a black background' expects a green star on black): subject, prompt, "
                   "style ('striped') or colour ('teal') fidelity. class_preservation: how far class prompts ('a red "
                   "shape on a white background') drift from what the model drew before training, in points.")
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("Connect to a trainer's scorer input, or to Combine Scorers / Evaluate Images.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "measure": (list(JUDGE_MEASURES), {"default": JUDGE_MEASURES[0],
                                               "tooltip": "fidelity (higher is better) or class_preservation (minus "
                                                          "the drop in points since before training)."}),
            "target": ("STRING", {"default": "green star",
                                  "tooltip": "What every sample must show besides what its prompt names: shape, "
                                             "colour and/or fill words ('green star', 'striped', 'teal'). Ignored by "
                                             "class_preservation."}),
            "prompts": ("STRING", {"default": "a sks shape\na sks shape on a black background", "multiline": True,
                                   "tooltip": "One prompt per line, sampled at every evaluation."}),
            "samples": _SAMPLES, "every": _EVERY, "patience": _PATIENCE, "seed": _SEED}}

    def run(self, measure, target, prompts, samples, every, patience, seed):
        scorer = JudgeScorer(every=int(every), patience=int(patience), node=self.NODE_ID, measure=measure,
                             target=str(target), prompts=str(prompts), samples=int(samples), seed=int(seed))
        scorer.check()
        return (scorer,)


class LoadFeatureModel(FTNode):
    NODE_ID = "FinetuneLoadFeatureModel"
    DISPLAY_NAME = "Load Feature Model (Finetune)"
    CATEGORY = SCORE_CATEGORY
    DESCRIPTION = ("Loads an image feature model you already have, offline: a CLIP vision file from "
                   "models/clip_vision (the ones IP-Adapter uses), or a transformers CLIP / DINO / DINOv2 folder in "
                   "models/clip_vision or models/feature_models (e.g. openai/clip-vit-base-patch32, "
                   "facebook/dinov2-small). Weights load through safetensors or weights-only loading.")
    RETURN_TYPES = (FEATURES,)
    RETURN_NAMES = ("features",)
    OUTPUT_TOOLTIPS = ("For a DINO / CLIP scorer and Evaluate Images.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = F.list_feature_models()
        return {"required": {"model_name": (names or [NONE], {
            "tooltip": "A file or folder in models/clip_vision or models/feature_models (an absolute path works "
                       "headless)."})}}

    @classmethod
    def IS_CHANGED(cls, model_name):
        try:
            return repr(F.signature(F.resolve_feature_model(model_name)))  # a folder: each of its files
        except FinetuneError:
            return ""

    def run(self, model_name):
        path = F.resolve_feature_model(model_name, node=self.NODE_ID, input="model_name")
        return (F.load_feature_model(path, node=self.NODE_ID, input="model_name"),)


class ScoreWithFeatures(FTNode):
    NODE_ID = "FinetuneScoreWithFeatures"
    DISPLAY_NAME = "Scorer: DINO / CLIP (Finetune)"
    CATEGORY = SCORE_CATEGORY
    DESCRIPTION = ("Scores samples with a DINO or CLIP model, as the DreamBooth paper measures: subject_similarity "
                   "(mean cosine to the instance images: DINO, or CLIP-I with a CLIP), prompt_alignment (CLIP-T: "
                   "image against prompt, needs a full CLIP folder), class_preservation (PRES: how much class-prompt "
                   "samples drift toward the subject since before training; higher = less drift).")
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("Connect to a trainer's scorer input, or to Combine Scorers / Evaluate Images.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features": (FEATURES, {"tooltip": "From Load Feature Model."}),
            "measure": (list(FEATURE_MEASURES), {"default": FEATURE_MEASURES[0], "tooltip": "What to measure."}),
            "prompts": ("STRING", {"default": "a photo of sks dog", "multiline": True,
                                   "tooltip": "One prompt per line, sampled at every evaluation (for "
                                              "class_preservation: class prompts such as 'a photo of a dog')."}),
            "samples": _SAMPLES, "every": _EVERY, "patience": _PATIENCE, "seed": _SEED},
            "optional": {"references": ("IMAGE", {"tooltip": "The subject's images; default: the trainer's "
                                                             "training images."})}}

    def run(self, features, measure, prompts, samples, every, patience, seed, references=None):
        scorer = FeatureScorer(every=int(every), patience=int(patience), node=self.NODE_ID, features=features,
                               measure=measure, prompts=str(prompts), samples=int(samples), seed=int(seed),
                               references=references)
        if measure == "prompt_alignment" or references is not None:
            scorer.check([references] if references is not None else [])
        return (scorer,)


class ScoreHeldOutLoss(FTNode):
    NODE_ID = "FinetuneScoreHeldOutLoss"
    DISPLAY_NAME = "Scorer: Held-out Loss (Finetune)"
    CATEGORY = SCORE_CATEGORY
    DESCRIPTION = ("The denoising loss of images kept out of training, at fixed noise and timesteps (so two steps "
                   "compare): the last `holdout` training images, or a validation dataset of your own. Lower is "
                   "better; as a score it counts negated. Combine it with weight 0 to draw the curve without choosing "
                   "by it.")
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("Connect to a trainer's scorer input or to Combine Scorers.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "holdout": ("INT", {"default": 1, "min": 0, "max": 10_000,
                                "tooltip": "How many training images (the last ones) to keep out of training; "
                                           "ignored when a dataset is connected."}),
            "every": _EVERY, "patience": _PATIENCE},
            "optional": {"dataset": (DATASET, {"tooltip": "A separate validation set (a Training Data node)."})}}

    def run(self, holdout, every, patience, dataset=None):
        if dataset is None and int(holdout) < 1:
            raise FinetuneError("there is nothing to hold out", input="holdout",
                                fix="hold out 1 or more training images, or connect a validation dataset")
        return (ValidationLossScorer(every=int(every), patience=int(patience), node=self.NODE_ID, dataset=dataset,
                                     holdout_count=int(holdout)),)


def _part(name: str) -> dict:
    return {
        f"weight_{name}": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                     "tooltip": f"Weight of scorer_{name} in the mean; 0 = drawn, not chosen by."}),
        f"floor_{name}": ("FLOAT", {"default": 0.0, "min": -1e6, "max": 1e6, "step": 0.01,
                                    "tooltip": f"scorer_{name} must reach this value, or the checkpoint ranks below "
                                               "every one that does (0 = no floor; class_preservation counts minus "
                                               "the drop, so -5 = 'at most 5 points of drift')."}),
    }


class CombineScorers(FTNode):
    NODE_ID = "FinetuneCombineScorers"
    DISPLAY_NAME = "Combine Scorers (Finetune)"
    CATEGORY = SCORE_CATEGORY
    DESCRIPTION = ("A weighted mean of up to three scorers, with floors: 'subject fidelity while prompt fidelity "
                   "stays above 0.7' is scorer_a = subject (weight 1), scorer_b = prompt (weight 0, floor 0.7). "
                   "Every part is drawn as its own curve; every and patience here replace the parts' own.")
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("Connect to a trainer's scorer input or to Evaluate Images.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"scorer_a": (SCORER, {"tooltip": "A scorer."}), **_part("a"),
                             "every": _EVERY, "patience": _PATIENCE},
                "optional": {"scorer_b": (SCORER, {"tooltip": "A second scorer."}), **_part("b"),
                             "scorer_c": (SCORER, {"tooltip": "A third scorer."}), **_part("c")}}

    def run(self, scorer_a, weight_a, floor_a, every, patience, scorer_b=None, weight_b=1.0, floor_b=0.0,
            scorer_c=None, weight_c=1.0, floor_c=0.0):
        parts = tuple(Part(s, float(w), float(f) if f else None)
                      for s, w, f in ((scorer_a, weight_a, floor_a), (scorer_b, weight_b, floor_b),
                                      (scorer_c, weight_c, floor_c)) if s is not None)
        if sum(p.weight for p in parts) <= 0:
            raise FinetuneError("every weight is 0, so nothing decides which checkpoint is best", input="weight_a",
                                fix="give at least one scorer a positive weight")
        return (Combined(every=int(every), patience=int(patience), node=self.NODE_ID, parts=parts),)


# ---------------------------------------------------------------------------------------------- evaluation
def list_inception_files() -> list[str]:
    """FID Inception weights files in models/feature_models (e.g. pt_inception-2015-12-05-6726825d.pth)."""
    names = set()
    for root in F.roots("feature_models"):
        if root.is_dir():
            names |= {p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and p.suffix.lower() in (".pth", ".pt", ".safetensors")
                      and "inception" in p.name.lower()}
    return sorted(names)


def _split_for(scorer, images: torch.Tensor, node: str) -> dict[str, torch.Tensor]:
    """The batch split evenly over the scorer's prompts, in order."""
    prompts = [p.prompt for p in scorer.probes()]
    if not prompts:
        return {}
    n = images.shape[0]
    if n % len(prompts):
        raise FinetuneError(f"{n} images cannot be split evenly over the scorer's {len(prompts)} prompt(s)",
                            node=node, input="images",
                            fix=f"pass {len(prompts)} x k images: the first k for the first prompt, and so on")
    k = n // len(prompts)
    return {p: images[i * k:(i + 1) * k] for i, p in enumerate(prompts)}


def _two_or_more(images, what: str, node: str, input: str) -> None:
    if images is None or images.shape[0] < 2:
        got = 0 if images is None else images.shape[0]
        raise FinetuneError(f"{what} compares distributions and needs at least 2 images here (got {got})", node=node,
                            input=input, fix="pass a batch of images (dozens to thousands: a few give a rough, "
                                             "biased figure; compare figures only at the same count)")


class EvaluateImages(FTNode):
    NODE_ID = "FinetuneEvaluateImages"
    DISPLAY_NAME = "Evaluate Images (Finetune)"
    CATEGORY = SCORE_CATEGORY
    DESCRIPTION = ("Scores an IMAGE batch against reference images: FID, KID and Inception Score with the standard "
                   "FID Inception weights (pt_inception-2015-12-05-6726825d.pth in models/feature_models), Frechet "
                   "and kernel distances on DINO / CLIP features (FD-DINOv2, KD-CLIP, ...), and any scorer. Figures "
                   "depend on the feature model and the image count: compare them only like for like.")
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("fid", "kid", "inception_score", "score", "report", "table")
    OUTPUT_TOOLTIPS = ("FID with the Inception weights, else the Frechet distance on the feature model (NaN if "
                       "neither).", "KID (x1000 is customary; this is the raw value), same features as fid.",
                       "Inception Score (NaN without the Inception weights).", "The scorer's value (NaN without).",
                       "Every figure as text.", "Every figure as a small table.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to evaluate (e.g. Sample's output)."})},
                "optional": {
                    "references": ("IMAGE", {"tooltip": "Real images to compare with (FID/KID, subject similarity)."}),
                    "features": (FEATURES, {"tooltip": "DINO / CLIP features for FD/KD and feature scorers."}),
                    "inception": ([NONE, *list_inception_files()], {
                        "default": NONE, "tooltip": "FID Inception weights in models/feature_models (FID, KID, IS)."}),
                    "scorer": (SCORER, {"tooltip": "A scorer; the images are split evenly over its prompts, in "
                                                   "order."}),
                    "kid_subset_size": ("INT", {"default": 1000, "min": 2, "max": 100_000,
                                                "tooltip": "KID subset size (capped at the image counts)."})}}

    def run(self, images, references=None, features=None, inception=NONE, scorer=None, kid_subset_size=1000):
        node = self.NODE_ID
        rows: list[tuple[str, str, str]] = []
        fid = kid = iscore = value = math.nan
        if inception and inception != NONE:
            path = F.resolve_under(F.roots("feature_models"), inception)
            if path is None:
                raise FinetuneError(f"'{inception}' is not in models/feature_models", node=node, input="inception",
                                    fix="put pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) there")
            net = I.load_fid_inception(path, node=node, input="inception")
            pool, logits = I.inception_features(net, images)
            iscore, is_std = M.inception_score(logits)
            rows.append(("IS", f"{iscore:.3f} +- {is_std:.3f}", f"Inception, {len(images)} images"))
            if references is not None:
                _two_or_more(images, "FID", node, "images")
                _two_or_more(references, "FID", node, "references")
                ref_pool, _ = I.inception_features(net, references)
                fid = M.frechet_distance(pool, ref_pool)
                kid, kid_std = M.kernel_inception_distance(pool, ref_pool, subset_size=int(kid_subset_size))
                rows += [("FID", f"{fid:.3f}", f"Inception pool3, {len(images)} vs {len(references)}"),
                         ("KID", f"{kid:.5f} +- {kid_std:.5f}", "Inception pool3")]
        if features is not None and references is not None:
            name = {"dinov2": "DINOv2", "dino": "DINO"}.get(features.kind, "CLIP")
            _two_or_more(images, f"FD-{name}", node, "images")
            _two_or_more(references, f"FD-{name}", node, "references")
            a, b = features.image_features(images), features.image_features(references)
            fd = M.frechet_distance(a, b)
            kd, kd_std = M.kernel_inception_distance(a, b, subset_size=int(kid_subset_size))
            if math.isnan(fid):
                fid, kid = fd, kd
            cos = float(M.cosine_matrix(a, b).mean())
            rows += [(f"FD-{name}", f"{fd:.4g}", f"{features.name}, {len(images)} vs {len(references)}"),
                     (f"KD-{name}", f"{kd:.5f} +- {kd_std:.5f}", features.name),
                     (f"{name}{'-I' if name == 'CLIP' else ''} similarity", f"{cos:.4f}", "mean cosine")]
        if scorer is not None:
            refs = [references] if references is not None else []
            bound = scorer.bind(refs, node=node)
            score = bound(Evaluation(0, _split_for(scorer, images, node)))
            value = score.value
            rows.append(("score", f"{value:.4g}", scorer.describe()))
            rows += [(k, f"{v:.4g}", "") for k, v in score.metrics.items() if k != "score"]
        if not rows:
            raise FinetuneError("there is nothing to compute", node=node, input="references",
                                fix="connect references and a feature model or choose the Inception weights (FID, "
                                    "KID), or connect a scorer")
        report = "\n".join(f"{k}: {v}" + (f"  ({w})" if w else "") for k, v, w in rows)
        return (float(fid), float(kid), float(iscore), float(value), report, table_image(rows))


NODES = [ScoreWithJudge, LoadFeatureModel, ScoreWithFeatures, ScoreHeldOutLoss, CombineScorers, EvaluateImages]
