"""Catalogue of bad inputs for every node (issue 7, item 4): one row per bad input, every row a test.

Each row names a node, the inputs it gets (called directly, or through the headless executor's validation of an API
prompt), and what must happen: an error of the given type whose message names the node, the input and carries a
"Fix:", or - for inputs that are merely unusual (empty prompt, Chinese text and paths, odd caption encodings) - a
normal result. Rows where the pack misbehaves today are marked ``xfail(strict=True)`` with the reason starting with
"BUG:"; when the code is fixed the row XPASSes and the marker must go.

Huge sizes must be refused before anything big is allocated: every row runs under a guard that raises
:class:`HugeAllocation` when torch or PIL is asked for a tensor/image far beyond what the tiny models need, and under
a per-row alarm so a hang fails the row instead of the suite.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfy_finetune import host
from comfy_finetune.core.embeddings import Embedding
from comfy_finetune.core.errors import FinetuneError, WorkflowError
from comfy_finetune.core.lora import LoraModule, LoraWeights, to_kohya_state_dict
from comfy_finetune.headless.executor import Executor, NodeExecutionError, PromptValidationError
from comfy_finetune.headless.runner import node_classes
from comfy_finetune.nodes.generation import Negative
from comfy_finetune.scoring.scorers import JudgeScorer, ValidationLossScorer

ROW_TIMEOUT_S = 60
MAX_TENSOR_ELEMENTS = 100_000_000  # 400 MB of fp32: far beyond anything the tiny models need
MAX_IMAGE_PIXELS = 50_000_000


# ============================================================================================== rows
@dataclass(frozen=True)
class Ref:
    """A placeholder resolved at run time: ``pipe:sd1``, ``dataset``, ``lora:sdxl``, ``images``, ... ."""

    key: str


@dataclass
class Row:
    id: str
    node: str
    inputs: dict = field(default_factory=dict)  # overrides of DEFAULTS[node]
    via: str = "direct"  # "direct": call the node; "executor": validate + run an API prompt
    error: type[BaseException] | None = FinetuneError  # None: must succeed
    match: str = ""  # regex searched in the message
    input: str | None = None  # the input the message must name
    check: Callable[[Any, Resources], None] | None = None  # for rows that must succeed
    bug: str | None = None  # set: xfail(strict=True), reason "BUG: ..."
    drop: tuple[str, ...] = ()  # inputs removed from the defaults
    before_training: bool = False  # the error must come before the first training step


PIPE, PIPE_SD2, PIPE_XL = Ref("pipe:sd1"), Ref("pipe:sd2"), Ref("pipe:sdxl")
DATASET = Ref("dataset")
COMMON_TRAIN = dict(steps=1, learning_rate=1e-4, batch_size=1, grad_accum=1, lr_schedule="constant", warmup_steps=0,
                    optimizer="adamw", precision="fp32", gradient_checkpointing=False, min_snr_gamma=0.0,
                    noise_offset=0.0, seed=0)
DATA_COMMON = dict(resolution=64, crop="center", flip=False, repeats=1, caption_prefix="", caption_dropout=0.0)

DEFAULTS: dict[str, dict] = {
    "LoadBase": dict(ckpt_name="diffusers/tiny-sd1", dtype="fp32", device="cpu"),
    "AddLoRA": dict(pipe=PIPE, lora_name="None", strength_unet=1.0, strength_text=1.0, lora=Ref("lora:sd1")),
    "NegativePrompt": dict(text="blurry"),
    "Sample": dict(pipe=PIPE, prompt="a red circle", seed=0, steps=2, cfg=5.0, sampler_name="euler",
                   scheduler="normal", width=64, height=64, batch_size=1),
    "FinetuneTrainingData": dict(folder="[example] red-circle", **DATA_COMMON, bucketing=False),
    "FinetuneTrainingDataFromImages": dict(images=Ref("images"), captions="", **DATA_COMMON),
    "FinetuneTrainLoRA": dict(pipe=PIPE, dataset=DATASET, rank=2, alpha=2.0, targets="attention",
                              train_text_encoder=False, text_learning_rate=5e-5, **COMMON_TRAIN),
    "LearnEmbedding": dict(pipe=PIPE, dataset=DATASET, token="<bad-inputs>", initializer="circle", num_vectors=1,
                           templates="object", **COMMON_TRAIN),
    "DreamBoothTrain": dict(pipe=PIPE, dataset=DATASET, instance_prompt="a photo of sks circle",
                            class_prompt="a photo of a circle", method="lora", prior_preservation=False,
                            prior_loss_weight=1.0, prior_mode="base_prediction", num_class_images=0,
                            train_text_encoder=False, text_learning_rate=5e-6, rank=2, alpha=2.0, **COMMON_TRAIN),
    "FinetuneNativeModelToPipe": dict(model="MODEL", clip="CLIP", vae="VAE", device="cpu"),
    "FinetunePivotalTuning": dict(pipe=PIPE, dataset=DATASET, instance_prompt="a photo of <piv> circle",
                                  class_prompt="a photo of a circle", token="<piv>", initializer="circle",
                                  num_vectors=1, embedding_learning_rate=1e-2, embedding_fraction=1.0,
                                  prior_preservation=False, prior_loss_weight=1.0, prior_mode="base_prediction",
                                  num_class_images=0, train_text_encoder=False, text_learning_rate=5e-6, rank=2,
                                  alpha=2.0, **COMMON_TRAIN),
    "FinetuneSaveLoRA": dict(lora=Ref("lora:sd1"), pipe=PIPE, name="bad_inputs/lora", layout="kohya",
                             overwrite=True),
    "FinetuneSaveEmbedding": dict(embedding=Ref("embedding:sd1"), pipe=PIPE, name="bad_inputs/embedding",
                                  overwrite=True),
    "FinetuneSaveCheckpoint": dict(pipe=PIPE, name="bad_inputs/checkpoint", format="single_file", dtype="fp16",
                                   overwrite=True),
    "LoadImage": dict(image="数据集/圆圈/红.png"),
    "FinetuneApplyLoRAToModel": dict(model="MODEL", clip="CLIP", lora=Ref("lora:sd1"), pipe=PIPE, strength_model=1.0,
                                     strength_clip=1.0),
    "FinetuneEmbeddingToPrompt": dict(embedding=Ref("embedding:sd1"), pipe=PIPE, name="bad_inputs/word",
                                      overwrite=True),
    "NativeLoRAToFinetune": dict(lora={}, pipe=PIPE),
    "FinetuneImageGrid": dict(images_1=Ref("images"), label_1="before"),
    "FinetuneScoreWithJudge": dict(measure="fidelity", target="green star", prompts="a sks shape", samples=2, every=0,
                                   patience=0, seed=0),
    "FinetuneLoadFeatureModel": dict(model_name="none"),
    "FinetuneScoreWithFeatures": dict(features=Ref("features:none"), measure="subject_similarity",
                                      prompts="a photo of sks dog", samples=2, every=0, patience=0, seed=0),
    "FinetuneScoreHeldOutLoss": dict(holdout=1, every=0, patience=0),
    "FinetuneCombineScorers": dict(scorer_a=Ref("scorer:judge"), weight_a=1.0, floor_a=0.0, every=0, patience=0),
    "FinetuneEvaluateImages": dict(images=Ref("images")),
    "FinetuneImagePrompt": dict(pipe=PIPE, image=Ref("images"), adapter_name="[built-in] shapes-tiny",
                                clip_vision_name="auto", strength=1.0),
    "FinetuneInstantID": dict(pipe=PIPE_XL, image=Ref("images"), instantid_name="nope.safetensors",
                              controlnet_name="None", ip_strength=0.8, controlnet_strength=0.8),
}


# ---------------------------------------------------------------------------------------------- checks for ok rows
def _is_image(out, res):
    images = out[0]
    assert isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == 3
    assert torch.isfinite(images).all()


def _captions(*expected):
    def check(out, res):
        got = sorted(ex.caption for ex in out[0].examples)
        assert got == sorted(expected), got
    return check


def _saved(folder_key: str, rel: str):
    def check(out, res):
        path = res.models / folder_key / rel
        assert path.exists(), f"{path} was not written"
        assert f"{folder_key}/{rel}" in " ".join(out["ui"]["text"])
    return check


def _trained(out, res):
    assert len(out) == 4


def _pivotal_trained(out, res):
    assert len(out) == 5 and out[2] is out[1].embeddings["piv"] and set(out[2].vectors) == {"te1", "te2"}


def _negative(out, res):
    assert isinstance(out[0], Negative)


CHINESE = "一只红色的圆，水彩画风格"
MIXED = "Ünïcödé café — naïve 🎨 круг ∑ 円 (red:1.2)"

ROWS: list[Row] = [
    # ------------------------------------------------------------------------------------------ LoadBase
    Row("LoadBase-ckpt_name-missing-file", "LoadBase", dict(ckpt_name="nope.safetensors"),
        match="not found", input="ckpt_name"),
    Row("LoadBase-ckpt_name-not-in-list-executor", "LoadBase", dict(ckpt_name="nope.safetensors"), via="executor",
        error=PromptValidationError, match="not one of the choices", input="ckpt_name"),
    Row("LoadBase-ckpt_name-int-executor", "LoadBase", dict(ckpt_name=5), via="executor",
        error=PromptValidationError, match="not one of the choices", input="ckpt_name"),
    Row("LoadBase-ckpt_name-corrupt-file", "LoadBase", dict(ckpt_name="bad_inputs/corrupt.safetensors"),
        match="corrupt|not a readable", input="ckpt_name"),
    Row("LoadBase-ckpt_name-empty", "LoadBase", dict(ckpt_name=""), match="not found", input="ckpt_name"),
    Row("LoadBase-dtype-unknown", "LoadBase", dict(dtype="fp64"), match="fp64", input="dtype"),
    Row("LoadBase-dtype-unknown-executor", "LoadBase", dict(dtype="fp64"), via="executor",
        error=PromptValidationError, match="fp64", input="dtype"),
    Row("LoadBase-device-unknown", "LoadBase", dict(device="tpu"), match="tpu", input="device"),
    Row("LoadBase-hub_id-path-like", "LoadBase", dict(hub_id="../../etc/passwd"), match="hub", input="hub_id"),
    Row("LoadBase-ckpt_name-chinese-folder-ok", "LoadBase", dict(ckpt_name="diffusers/小模型"), error=None,
        check=lambda out, res: out[0].family.value == "sd1"),
    # ------------------------------------------------------------------------------------------ AddLoRA
    Row("AddLoRA-pipe-STRING", "AddLoRA", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("AddLoRA-pipe-STRING-executor", "AddLoRA", dict(pipe="a pipe", lora_name="中文/低秩.safetensors"),
        via="executor", error=FinetuneError, input="pipe"),
    Row("AddLoRA-lora-STRING", "AddLoRA", dict(lora="a lora"), match="lora", input="lora"),
    Row("AddLoRA-no-lora", "AddLoRA", dict(lora=None), match="no LoRA given", input="lora_name"),
    Row("AddLoRA-lora_name-missing", "AddLoRA", dict(lora=None, lora_name="nope.safetensors"), match="not found",
        input="lora_name"),
    Row("AddLoRA-lora_name-not-in-list-executor", "AddLoRA", dict(lora_name="nope.safetensors"), via="executor",
        error=PromptValidationError, match="not one of the choices", input="lora_name"),
    Row("AddLoRA-lora_name-other-family", "AddLoRA", dict(lora=None, lora_name="bad_inputs/kohya-sdxl.safetensors"),
        match="SDXL|SD 1", input="lora_name"),
    Row("AddLoRA-lora-other-family", "AddLoRA", dict(lora=Ref("lora:sdxl")), match="SDXL.*SD 1.x", input="lora"),
    Row("AddLoRA-lora_name-corrupt", "AddLoRA", dict(lora=None, lora_name="bad_inputs/corrupt.safetensors"),
        match="corrupt|not a readable|safetensors", input="lora_name"),
    Row("AddLoRA-strength-not-a-number-executor", "AddLoRA", dict(strength_unet="strong"), via="executor",
        error=PromptValidationError, match="cannot be converted", input="strength_unet"),
    Row("AddLoRA-strength-too-big-executor", "AddLoRA", dict(strength_text=1000.0), via="executor",
        error=PromptValidationError, match="maximum", input="strength_text"),
    Row("AddLoRA-lora_name-chinese-ok", "AddLoRA", dict(lora=None, lora_name="中文/低秩.safetensors"), error=None,
        check=lambda out, res: len(out[0].patches) == 1),
    # ------------------------------------------------------------------------------------------ image prompts
    Row("FinetuneImagePrompt-adapter-for-another-model", "FinetuneImagePrompt", {}, match="cross-attention",
        input="adapter_name"),
    Row("FinetuneImagePrompt-adapter_name-missing", "FinetuneImagePrompt", dict(adapter_name="nope.safetensors"),
        match="not found", input="adapter_name"),
    Row("FinetuneImagePrompt-adapter_name-not-in-list-executor", "FinetuneImagePrompt",
        dict(adapter_name="nope.safetensors"), via="executor", error=PromptValidationError,
        match="not one of the choices", input="adapter_name"),
    Row("FinetuneImagePrompt-strength-too-big-executor", "FinetuneImagePrompt", dict(strength=100.0), via="executor",
        error=PromptValidationError, match="maximum", input="strength"),
    Row("FinetuneInstantID-instantid_name-missing", "FinetuneInstantID", {}, match="not found",
        input="instantid_name"),
    Row("FinetuneInstantID-instantid_name-not-in-list-executor", "FinetuneInstantID", {}, via="executor",
        error=PromptValidationError, match="not one of the choices", input="instantid_name"),
    # ------------------------------------------------------------------------------------------ NegativePrompt
    Row("NegativePrompt-empty-ok", "NegativePrompt", dict(text=""), error=None, check=_negative),
    Row("NegativePrompt-chinese-ok", "NegativePrompt", dict(text=CHINESE), error=None, check=_negative),
    Row("NegativePrompt-text-int-executor-coerced-ok", "NegativePrompt", dict(text=5), via="executor", error=None,
        check=lambda out, res: out[0].text == "5"),
    # ------------------------------------------------------------------------------------------ Sample
    Row("Sample-pipe-STRING", "Sample", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("Sample-pipe-STRING-executor", "Sample", dict(pipe="a pipe"), via="executor", error=FinetuneError,
        input="pipe"),
    Row("Sample-pipe-linked-to-IMAGE-executor", "Sample", dict(pipe=Ref("link:images")), via="executor",
        error=PromptValidationError, match="takes 'FT_PIPE'", input="pipe"),
    Row("Sample-negative-STRING", "Sample", dict(negative="ugly"), match="negative", input="negative"),
    Row("Sample-steps-0", "Sample", dict(steps=0), match="at least 1", input="steps"),
    Row("Sample-steps-0-executor", "Sample", dict(steps=0), via="executor", error=PromptValidationError,
        match="minimum", input="steps"),
    Row("Sample-steps-not-a-number-executor", "Sample", dict(steps="many"), via="executor",
        error=PromptValidationError, match="cannot be converted", input="steps"),
    Row("Sample-cfg-negative-executor", "Sample", dict(cfg=-1.0), via="executor", error=PromptValidationError,
        match="minimum", input="cfg"),
    Row("Sample-cfg-nan-executor", "Sample", dict(cfg=float("nan")), via="executor", error=FinetuneError,
        input="cfg"),
    Row("Sample-width-100", "Sample", dict(width=100), match="multiple of 8", input="width"),
    Row("Sample-width-100-executor", "Sample", dict(width=100), via="executor", error=NodeExecutionError,
        match="multiple of 8", input="width"),
    Row("Sample-width-100000-executor", "Sample", dict(width=100000), via="executor", error=PromptValidationError,
        match="maximum", input="width"),
    Row("Sample-width-height-100000", "Sample", dict(width=100000, height=100000), match="width|height",
        input="width"),
    Row("Sample-huge-batch-within-schema-executor", "Sample", dict(width=16384, height=16384, batch_size=4096),
        via="executor", error=FinetuneError, match="memory|large|size", input="batch_size"),
    Row("Sample-batch_size-0", "Sample", dict(batch_size=0), match="at least 1", input="batch_size"),
    Row("Sample-sampler-unknown", "Sample", dict(sampler_name="warp_drive"), match="warp_drive",
        input="sampler_name"),
    Row("Sample-sampler-unknown-executor", "Sample", dict(sampler_name="warp_drive"), via="executor",
        error=PromptValidationError, match="warp_drive.*not one of the choices", input="sampler_name"),
    Row("Sample-scheduler-unknown", "Sample", dict(scheduler="sometimes"), match="sometimes", input="scheduler"),
    Row("Sample-seed-negative-executor", "Sample", dict(seed=-1), via="executor", error=PromptValidationError,
        match="minimum", input="seed"),
    Row("Sample-seed-2**64-executor", "Sample", dict(seed=2 ** 64), via="executor", error=PromptValidationError,
        match="maximum", input="seed"),
    Row("Sample-prompt-empty-ok", "Sample", dict(prompt=""), error=None, check=_is_image),
    Row("Sample-prompt-chinese-ok", "Sample", dict(prompt=CHINESE), error=None, check=_is_image),
    Row("Sample-prompt-non-ascii-ok", "Sample", dict(prompt=MIXED), error=None, check=_is_image),
    Row("Sample-prompt-chinese-sdxl-ok", "Sample", dict(pipe=PIPE_XL, prompt=CHINESE), error=None, check=_is_image),
    Row("Sample-prompt-chinese-executor-ok", "Sample", dict(prompt=CHINESE), via="executor", error=None,
        check=_is_image),
    Row("Sample-prompt-chinese-embedding-name-ok", "Sample", dict(prompt=f"{CHINESE}, embedding:嵌入/猫"),
        error=None, check=_is_image),
    Row("Sample-prompt-embedding-missing", "Sample", dict(prompt="a embedding:no_such_embedding circle"),
        match="no_such_embedding.*not found", input="prompt"),
    Row("Sample-prompt-embedding-wrong-vector-size", "Sample", dict(prompt="a embedding:bad_inputs_wide circle"),
        match="size 7", input="prompt"),
    Row("Sample-prompt-embedding-corrupt", "Sample", dict(prompt="embedding:bad_inputs_corrupt"),
        match="corrupt|not a readable", input="prompt"),
    # ------------------------------------------------------------------------------------------ TrainingData
    Row("TrainingData-folder-empty-string", "FinetuneTrainingData", dict(folder=""), match="empty", input="folder"),
    Row("TrainingData-folder-missing", "FinetuneTrainingData", dict(folder="no_such_folder"), match="not found",
        input="folder"),
    Row("TrainingData-folder-zero-images", "FinetuneTrainingData", dict(folder="bad_inputs/empty"), match="no images",
        input="folder"),
    Row("TrainingData-folder-only-captions", "FinetuneTrainingData", dict(folder="bad_inputs/captions_only"),
        match="no images", input="folder"),
    Row("TrainingData-corrupt-image", "FinetuneTrainingData", dict(folder="bad_inputs/corrupt"), match="broken.png",
        input="folder"),
    Row("TrainingData-truncated-image", "FinetuneTrainingData", dict(folder="bad_inputs/truncated"), match="cut.png",
        input="folder"),
    Row("TrainingData-image-is-a-text-file", "FinetuneTrainingData", dict(folder="bad_inputs/not_an_image"),
        match="fake.jpg", input="folder"),
    Row("TrainingData-captions-utf16-latin1-ok", "FinetuneTrainingData", dict(folder="bad_inputs/encodings"),
        error=None, check=_captions("café crème brûlée", "一只猫 café", "plain ascii")),
    Row("TrainingData-chinese-folder-and-captions-ok", "FinetuneTrainingData", dict(folder="数据集/圆圈"), error=None,
        check=_captions("红色的圆", "蓝色的圆")),
    Row("TrainingData-resolution-100", "FinetuneTrainingData", dict(resolution=100), match="multiple of 8",
        input="resolution"),
    Row("TrainingData-resolution-0-executor", "FinetuneTrainingData", dict(resolution=0), via="executor",
        error=PromptValidationError, match="minimum", input="resolution"),
    Row("TrainingData-resolution-100000-executor", "FinetuneTrainingData", dict(resolution=100000), via="executor",
        error=PromptValidationError, match="maximum", input="resolution"),
    Row("TrainingData-resolution-100000", "FinetuneTrainingData", dict(resolution=100000), match="resolution",
        input="resolution"),
    Row("TrainingData-crop-unknown", "FinetuneTrainingData", dict(crop="diagonal"), match="diagonal", input="crop"),
    Row("TrainingData-crop-unknown-executor", "FinetuneTrainingData", dict(crop="diagonal"), via="executor",
        error=PromptValidationError, match="not one of the choices", input="crop"),
    Row("TrainingData-repeats-0", "FinetuneTrainingData", dict(repeats=0), match="at least 1", input="repeats"),
    Row("TrainingData-caption_dropout-2", "FinetuneTrainingData", dict(caption_dropout=2.0), match="between 0 and 1",
        input="caption_dropout"),
    Row("TrainingData-caption_dropout-2-executor", "FinetuneTrainingData", dict(caption_dropout=2.0), via="executor",
        error=PromptValidationError, match="maximum", input="caption_dropout"),
    Row("TrainingData-caption_prefix-chinese-ok", "FinetuneTrainingData", dict(caption_prefix="中文触发词,"),
        error=None, check=lambda out, res: out[0].caption_prefix == "中文触发词,"),
    # ------------------------------------------------------------------------------------------ TrainingDataFromImages
    Row("TrainingDataFromImages-images-STRING", "FinetuneTrainingDataFromImages", dict(images="a picture"),
        match="IMAGE", input="images"),
    Row("TrainingDataFromImages-images-STRING-executor", "FinetuneTrainingDataFromImages", dict(images="a picture"),
        via="executor", error=FinetuneError, match="IMAGE", input="images"),
    Row("TrainingDataFromImages-zero-images", "FinetuneTrainingDataFromImages", dict(images=Ref("images:empty")),
        match="no images", input="images"),
    Row("TrainingDataFromImages-wrong-shape", "FinetuneTrainingDataFromImages", dict(images=Ref("images:chw")),
        match="IMAGE", input="images"),
    Row("TrainingDataFromImages-caption-count", "FinetuneTrainingDataFromImages", dict(captions="one\ntwo"),
        match="captions for", input="captions"),
    Row("TrainingDataFromImages-chinese-captions-ok", "FinetuneTrainingDataFromImages",
        dict(captions="红色\n绿色\n蓝色"), error=None, check=_captions("红色", "绿色", "蓝色")),
    Row("TrainingDataFromImages-resolution-100000", "FinetuneTrainingDataFromImages", dict(resolution=100000),
        match="resolution", input="resolution"),
    Row("TrainingDataFromImages-bucketing-executor-ok", "FinetuneTrainingDataFromImages",
        dict(images=Ref("link:images"), bucketing=True), via="executor", error=None,
        check=lambda out, res: out[0].bucketing),
    # an API prompt saved before the node had bucketing: the optional input takes its default
    Row("TrainingDataFromImages-saved-without-bucketing-executor-ok", "FinetuneTrainingDataFromImages",
        dict(images=Ref("link:images")), via="executor", error=None, check=lambda out, res: not out[0].bucketing),
    # ------------------------------------------------------------------------------------------ TrainLoRA
    Row("TrainLoRA-pipe-STRING", "FinetuneTrainLoRA", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("TrainLoRA-pipe-STRING-executor", "FinetuneTrainLoRA", dict(pipe="a pipe"), via="executor",
        error=FinetuneError, input="pipe"),
    Row("TrainLoRA-dataset-STRING", "FinetuneTrainLoRA", dict(dataset="my_dog"), match="dataset", input="dataset"),
    Row("TrainLoRA-steps-0", "FinetuneTrainLoRA", dict(steps=0), match="at least 1", input="steps"),
    Row("TrainLoRA-steps-0-executor", "FinetuneTrainLoRA", dict(steps=0), via="executor", error=PromptValidationError,
        match="minimum", input="steps"),
    Row("TrainLoRA-learning_rate-0", "FinetuneTrainLoRA", dict(learning_rate=0.0), match="positive",
        input="learning_rate"),
    Row("TrainLoRA-learning_rate-0-executor", "FinetuneTrainLoRA", dict(learning_rate=0.0), via="executor",
        error=NodeExecutionError, match="positive", input="learning_rate"),
    Row("TrainLoRA-learning_rate-negative-executor", "FinetuneTrainLoRA", dict(learning_rate=-1.0), via="executor",
        error=PromptValidationError, match="minimum", input="learning_rate"),
    Row("TrainLoRA-learning_rate-nan", "FinetuneTrainLoRA", dict(learning_rate=float("nan")), match="positive",
        input="learning_rate"),
    Row("TrainLoRA-batch_size-larger-than-dataset", "FinetuneTrainLoRA", dict(batch_size=50), match="larger than",
        input="batch_size"),
    Row("TrainLoRA-rank-larger-than-layer", "FinetuneTrainLoRA", dict(rank=512), match="larger than the layer",
        input="rank"),
    Row("TrainLoRA-rank-0", "FinetuneTrainLoRA", dict(rank=0), match="at least 1", input="rank"),
    Row("TrainLoRA-targets-unknown", "FinetuneTrainLoRA", dict(targets="everything"), match="everything",
        input="targets"),
    Row("TrainLoRA-optimizer-unknown-executor", "FinetuneTrainLoRA", dict(optimizer="sgd"), via="executor",
        error=PromptValidationError, match="not one of the choices", input="optimizer"),
    Row("TrainLoRA-warmup-not-below-steps", "FinetuneTrainLoRA", dict(steps=2, warmup_steps=2), match="warmup",
        input="warmup_steps"),
    Row("TrainLoRA-validation_size-100", "FinetuneTrainLoRA", dict(validation_prompt="a red circle",
                                                                 validation_size=100, validation_steps=1),
        match="multiple of 8", input="validation_size", before_training=True),
    Row("TrainLoRA-validation_size-100000", "FinetuneTrainLoRA", dict(validation_prompt="a red circle",
                                                                    validation_size=100000, validation_steps=1),
        match="validation_size", input="validation_size", before_training=True),
    Row("TrainLoRA-validation_sampler-unknown", "FinetuneTrainLoRA", dict(validation_prompt="a red circle",
                                                                        validation_sampler="warp_drive",
                                                                        validation_steps=1, validation_size=64),
        match="warp_drive", input="validation_sampler", before_training=True),
    Row("TrainLoRA-negative-STRING", "FinetuneTrainLoRA", dict(validation_prompt="a red circle", negative="ugly",
                                                             validation_steps=1, validation_size=64),
        match="negative", input="negative"),
    Row("TrainLoRA-chinese-validation-prompt-ok", "FinetuneTrainLoRA", dict(validation_prompt=CHINESE,
                                                                          validation_steps=1, validation_size=64),
        error=None, check=_trained),
    Row("TrainLoRA-dataset-chinese-captions-ok", "FinetuneTrainLoRA", dict(dataset=Ref("dataset:chinese")), error=None,
        check=_trained),
    # ------------------------------------------------------------------------------------------ LearnEmbedding
    Row("LearnEmbedding-token-empty", "LearnEmbedding", dict(token=""), match="empty", input="token"),
    Row("LearnEmbedding-token-spaces", "LearnEmbedding", dict(token="my dog"), match="whitespace", input="token"),
    Row("LearnEmbedding-token-existing-word", "LearnEmbedding", dict(token="circle"), match="already a word",
        input="token"),
    Row("LearnEmbedding-token-prompt-syntax", "LearnEmbedding", dict(token="(dog:1.2)"), match="contains",
        input="token"),
    Row("LearnEmbedding-num_vectors-0", "LearnEmbedding", dict(num_vectors=0), match="at least 1",
        input="num_vectors"),
    Row("LearnEmbedding-num_vectors-0-executor", "LearnEmbedding", dict(num_vectors=0), via="executor",
        error=PromptValidationError, match="minimum", input="num_vectors"),
    Row("LearnEmbedding-learning_rate-0", "LearnEmbedding", dict(learning_rate=0.0), match="positive",
        input="learning_rate"),
    Row("LearnEmbedding-templates-unknown", "LearnEmbedding", dict(templates="poems"), match="poems",
        input="templates"),
    Row("LearnEmbedding-batch_size-larger-than-dataset", "LearnEmbedding", dict(batch_size=50),
        match="larger than", input="batch_size"),
    Row("LearnEmbedding-pipe-STRING", "LearnEmbedding", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("LearnEmbedding-dataset-STRING", "LearnEmbedding", dict(dataset="my_dog"), match="dataset",
        input="dataset"),
    Row("LearnEmbedding-chinese-token-ok", "LearnEmbedding", dict(token="<猫猫>", templates="captions",
                                                                dataset=Ref("dataset:chinese")),
        error=None, check=_trained),
    # ------------------------------------------------------------------------------------------ DreamBoothTrain
    Row("DreamBoothTrain-instance_prompt-empty", "DreamBoothTrain", dict(instance_prompt=""), match="empty",
        input="instance_prompt"),
    Row("DreamBoothTrain-instance_prompt-blank", "DreamBoothTrain", dict(instance_prompt="   "), match="empty",
        input="instance_prompt"),
    Row("DreamBoothTrain-class_prompt-empty-with-prior", "DreamBoothTrain",
        dict(class_prompt="", prior_preservation=True), match="empty", input="class_prompt"),
    Row("DreamBoothTrain-num_class_images-0", "DreamBoothTrain",
        dict(prior_preservation=True, prior_mode="class_images", num_class_images=0), match="class image",
        input="num_class_images"),
    Row("DreamBoothTrain-method-unknown", "DreamBoothTrain", dict(method="half"), match="half", input="method"),
    Row("DreamBoothTrain-method-unknown-executor", "DreamBoothTrain", dict(method="half"), via="executor",
        error=PromptValidationError, match="not one of the choices", input="method"),
    Row("DreamBoothTrain-learning_rate-0", "DreamBoothTrain", dict(learning_rate=0.0), match="positive",
        input="learning_rate"),
    Row("DreamBoothTrain-rank-larger-than-layer", "DreamBoothTrain", dict(rank=512), match="larger than",
        input="rank"),
    Row("DreamBoothTrain-batch_size-larger-than-dataset", "DreamBoothTrain", dict(batch_size=50),
        match="larger than", input="batch_size"),
    Row("DreamBoothTrain-pipe-STRING", "DreamBoothTrain", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("DreamBoothTrain-class_dataset-STRING", "DreamBoothTrain",
        dict(class_dataset="dogs", prior_preservation=True, prior_mode="class_images"), match="class_dataset",
        input="class_dataset"),
    Row("DreamBoothTrain-chinese-instance-prompt-ok", "DreamBoothTrain",
        dict(instance_prompt="一张 sks 圆的照片", class_prompt="一张圆的照片", prior_preservation=True,
             prior_mode="base_prediction"), error=None, check=_trained),
    # ------------------------------------------------------------------------------------------ NativeModelToPipe
    Row("NativeModelToPipe-headless", "FinetuneNativeModelToPipe", dict(), match="needs ComfyUI", input="model"),
    Row("NativeModelToPipe-model-constant-executor", "FinetuneNativeModelToPipe", dict(), via="executor",
        error=PromptValidationError, match="type MODEL", input="model"),
    Row("NativeModelToPipe-device-unknown-executor", "FinetuneNativeModelToPipe", dict(device="tpu"),
        via="executor", error=PromptValidationError, match="tpu", input="device"),
    # ------------------------------------------------------------------------------------------ FinetunePivotalTuning
    Row("PivotalTuning-instance_prompt-without-token", "FinetunePivotalTuning",
        dict(instance_prompt="a photo of sks circle"), match="does not contain the token", input="instance_prompt",
        before_training=True),
    Row("PivotalTuning-token-two-words", "FinetunePivotalTuning", dict(token="my dog"), match="whitespace",
        input="token", before_training=True),
    Row("PivotalTuning-token-existing-word-executor", "FinetunePivotalTuning",
        dict(token="circle", instance_prompt="a photo of circle"), via="executor", match="already a word",
        input="token"),
    Row("PivotalTuning-embedding_learning_rate-0", "FinetunePivotalTuning", dict(embedding_learning_rate=0.0),
        match="positive", input="embedding_learning_rate", before_training=True),
    Row("PivotalTuning-pipe-STRING", "FinetunePivotalTuning", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("PivotalTuning-sdxl-ok", "FinetunePivotalTuning", dict(pipe=PIPE_XL), error=None, check=_pivotal_trained),
    # ------------------------------------------------------------------------------------------ LoadImage (headless)
    Row("LoadImage-missing-file", "LoadImage", dict(image="no_such_image.png"), match="not found", input="image"),
    Row("LoadImage-missing-file-executor", "LoadImage", dict(image="no_such_image.png"), via="executor",
        error=PromptValidationError, match="no_such_image.png", input="image"),
    Row("LoadImage-corrupt-file-executor", "LoadImage", dict(image="bad_inputs/corrupt/broken.png"), via="executor",
        error=FinetuneError, match="broken.png", input="image"),
    Row("LoadImage-chinese-name-ok", "LoadImage", dict(image="数据集/圆圈/红.png"), error=None,
        check=lambda out, res: tuple(out[0].shape) == (1, 48, 48, 3)),
    # ------------------------------------------------------------------------------------------ bridges
    Row("ApplyLoRAToModel-lora-STRING", "FinetuneApplyLoRAToModel", dict(lora="my_lora"), match="FT_LORA",
        input="lora"),
    Row("ApplyLoRAToModel-pipe-STRING", "FinetuneApplyLoRAToModel", dict(pipe="a pipe"), match="FT_PIPE",
        input="pipe"),
    Row("ApplyLoRAToModel-lora-other-family", "FinetuneApplyLoRAToModel", dict(lora=Ref("lora:sdxl")), match="SDXL",
        input="lora"),
    Row("ApplyLoRAToModel-strength-too-big-executor", "FinetuneApplyLoRAToModel", dict(strength_model=1000.0),
        via="executor", error=PromptValidationError, match="maximum", input="strength_model"),
    Row("EmbeddingToPrompt-embedding-STRING", "FinetuneEmbeddingToPrompt", dict(embedding="my_embedding"),
        match="FT_EMBEDDING", input="embedding"),
    Row("EmbeddingToPrompt-embedding-missing-executor", "FinetuneEmbeddingToPrompt", dict(), via="executor",
        error=PromptValidationError, match="missing", input="embedding"),
    Row("EmbeddingToPrompt-wrong-vector-size", "FinetuneEmbeddingToPrompt", dict(embedding=Ref("embedding:wide")),
        match="size 7|wide", input="embedding"),
    Row("EmbeddingToPrompt-name-with-space", "FinetuneEmbeddingToPrompt", dict(name="my concept"), match="space",
        input="name"),
    Row("EmbeddingToPrompt-name-dotdot", "FinetuneEmbeddingToPrompt", dict(name="../escape"), match="'..'",
        input="name"),
    Row("EmbeddingToPrompt-name-chinese-ok", "FinetuneEmbeddingToPrompt", dict(name="提示/猫词"), error=None,
        check=lambda out, res: out["result"][0] == "embedding:提示/猫词"
        and (res.models / "embeddings" / "提示" / "猫词.safetensors").exists()),
    Row("NativeLoRAToFinetune-lora-empty", "NativeLoRAToFinetune", dict(lora={}), match="empty", input="lora"),
    Row("NativeLoRAToFinetune-lora-STRING", "NativeLoRAToFinetune", dict(lora="my_lora"), match="LORA_MODEL",
        input="lora"),
    Row("NativeLoRAToFinetune-lora-foreign-keys", "NativeLoRAToFinetune",
        dict(lora={"foo.lora_up.weight": torch.zeros(4, 2), "foo.lora_down.weight": torch.zeros(2, 4)}),
        match="match", input="lora"),
    Row("NativeLoRAToFinetune-pipe-STRING", "NativeLoRAToFinetune", dict(pipe="a pipe"), match="FT_PIPE",
        input="pipe"),
    Row("NativeLoRAToFinetune-lora-missing-executor", "NativeLoRAToFinetune", dict(), via="executor",
        error=PromptValidationError, match="missing", input="lora", drop=("lora",)),
    Row("FinetuneImageGrid-images-STRING", "FinetuneImageGrid", dict(images_2="a picture"), match="IMAGE",
        input="images_2"),
    Row("FinetuneImageGrid-images-2d-tensor", "FinetuneImageGrid", dict(images_2=torch.zeros(16, 16)),
        match="IMAGE", input="images_2"),
    Row("FinetuneImageGrid-images-missing-executor", "FinetuneImageGrid", dict(), via="executor",
        error=PromptValidationError, match="missing", input="images_1", drop=("images_1",)),
    Row("FinetuneImageGrid-two-rows-ok", "FinetuneImageGrid", dict(images_2=Ref("images"), label_2="after"),
        error=None, check=lambda out, res: out[0].shape[0] == 1 and out[0].shape[-1] == 3),
    # ------------------------------------------------------------------------------------------ scoring
    Row("ScoreWithJudge-nothing-to-check", "FinetuneScoreWithJudge", dict(target="", prompts="a photo of a dog"),
        match="judge can check", input="target"),
    Row("ScoreWithJudge-no-prompts", "FinetuneScoreWithJudge", dict(prompts=" \n "), match="no prompts",
        input="prompts"),
    Row("ScoreWithJudge-measure-unknown-executor", "FinetuneScoreWithJudge", dict(measure="accuracy"),
        via="executor", error=PromptValidationError, match="not one of the choices", input="measure"),
    Row("ScoreWithJudge-ok", "FinetuneScoreWithJudge", dict(prompts="a sks shape\n\na sks shape on a black "
                                                                   "background"), error=None,
        check=lambda out, res: [p.prompt for p in out[0].probes()] == ["a sks shape",
                                                                       "a sks shape on a black background"]),
    Row("LoadFeatureModel-missing", "FinetuneLoadFeatureModel", dict(model_name="dinov2-small"), match="not found",
        input="model_name"),
    Row("LoadFeatureModel-escape", "FinetuneLoadFeatureModel", dict(model_name="../../etc"), match="not found",
        input="model_name"),
    Row("LoadFeatureModel-not-in-list-executor", "FinetuneLoadFeatureModel", dict(model_name="dinov2-small"),
        via="executor", error=PromptValidationError, match="not one of the choices", input="model_name"),
    Row("ScoreWithFeatures-features-STRING", "FinetuneScoreWithFeatures", dict(features="dinov2"),
        match="FT_FEATURES", input="features"),
    Row("ScoreWithFeatures-features-missing-executor", "FinetuneScoreWithFeatures", dict(), via="executor",
        error=PromptValidationError, match="missing", input="features", drop=("features",)),
    Row("ScoreHeldOutLoss-nothing-held-out", "FinetuneScoreHeldOutLoss", dict(holdout=0), match="nothing to hold out",
        input="holdout"),
    Row("ScoreHeldOutLoss-negative-executor", "FinetuneScoreHeldOutLoss", dict(holdout=-1), via="executor",
        error=PromptValidationError, match="minimum", input="holdout"),
    Row("ScoreHeldOutLoss-with-dataset-executor-ok", "FinetuneScoreHeldOutLoss", dict(holdout=0, dataset=DATASET),
        via="executor", error=None, check=lambda out, res: out[0].holdout == 0 and out[0].heldout_set is not None),
    Row("CombineScorers-scorer-STRING", "FinetuneCombineScorers", dict(scorer_a="judge"), match="FT_SCORER",
        input="scorer_a"),
    Row("CombineScorers-all-weights-zero", "FinetuneCombineScorers", dict(weight_a=0.0), match="every weight is 0",
        input="weight_a"),
    Row("CombineScorers-scorer-missing-executor", "FinetuneCombineScorers", dict(), via="executor",
        error=PromptValidationError, match="missing", input="scorer_a", drop=("scorer_a",)),
    Row("EvaluateImages-nothing-to-compute", "FinetuneEvaluateImages", dict(), match="nothing to compute",
        input="references"),
    Row("EvaluateImages-uneven-split", "FinetuneEvaluateImages", dict(scorer=Ref("scorer:judge2")),
        match="split evenly", input="images"),
    Row("EvaluateImages-images-STRING", "FinetuneEvaluateImages", dict(images="pictures"), match="IMAGE",
        input="images"),
    Row("EvaluateImages-inception-unknown-executor", "FinetuneEvaluateImages", dict(inception="pt_inception.pth"),
        via="executor", error=PromptValidationError, match="not one of the choices", input="inception"),
    Row("EvaluateImages-judge-ok", "FinetuneEvaluateImages", dict(scorer=Ref("scorer:judge")), error=None,
        check=lambda out, res: 0.0 <= out[3] <= 1.0 and "score" in out[4] and out[5].shape[-1] == 3),
    Row("TrainLoRA-scorer-STRING", "FinetuneTrainLoRA", dict(scorer="judge"), match="FT_SCORER", input="scorer"),
    Row("TrainLoRA-scorer-holds-out-everything", "FinetuneTrainLoRA", dict(scorer=Ref("scorer:holdout-all")),
        match="leaves none", input="scorer", before_training=True),
    # ------------------------------------------------------------------------------------------ FinetuneSaveLoRA
    Row("FinetuneSaveLoRA-name-empty", "FinetuneSaveLoRA", dict(name=""), match="empty", input="name"),
    Row("FinetuneSaveLoRA-name-blank", "FinetuneSaveLoRA", dict(name="  / "), match="name", input="name"),
    Row("FinetuneSaveLoRA-other-family", "FinetuneSaveLoRA", dict(lora=Ref("lora:sdxl")), match="SDXL",
        input="lora"),
    Row("FinetuneSaveLoRA-empty-lora", "FinetuneSaveLoRA", dict(lora=Ref("lora:empty")), match="", input="lora"),
    Row("FinetuneSaveLoRA-layout-unknown", "FinetuneSaveLoRA", dict(layout="onnx"), match="onnx", input="layout"),
    Row("FinetuneSaveLoRA-layout-unknown-executor", "FinetuneSaveLoRA", dict(layout="onnx"), via="executor",
        error=PromptValidationError, match="not one of the choices", input="layout"),
    Row("FinetuneSaveLoRA-lora-STRING", "FinetuneSaveLoRA", dict(lora="my_lora"), match="lora", input="lora"),
    Row("FinetuneSaveLoRA-pipe-STRING", "FinetuneSaveLoRA", dict(pipe="a pipe"), match="pipe", input="pipe"),
    Row("FinetuneSaveLoRA-name-chinese-ok", "FinetuneSaveLoRA", dict(name="中文/我的_lora"), error=None,
        check=_saved("loras", "中文/我的_lora.safetensors")),
    # ------------------------------------------------------------------------------------------ FinetuneSaveEmbedding
    Row("FinetuneSaveEmbedding-wrong-vector-size", "FinetuneSaveEmbedding", dict(pipe=PIPE_XL),
        match="vectors", input="embedding"),
    Row("FinetuneSaveEmbedding-wrong-width", "FinetuneSaveEmbedding", dict(embedding=Ref("embedding:wide")),
        match="size 7|wide", input="embedding"),
    Row("FinetuneSaveEmbedding-name-empty", "FinetuneSaveEmbedding", dict(name=""), match="empty", input="name"),
    Row("FinetuneSaveEmbedding-embedding-STRING", "FinetuneSaveEmbedding", dict(embedding="my_embedding"),
        match="embedding", input="embedding"),
    Row("FinetuneSaveEmbedding-name-chinese-ok", "FinetuneSaveEmbedding", dict(name="嵌入/狗"), error=None,
        check=_saved("embeddings", "嵌入/狗.safetensors")),
    # ------------------------------------------------------------------------------------------ FinetuneSaveCheckpoint
    Row("FinetuneSaveCheckpoint-name-empty", "FinetuneSaveCheckpoint", dict(name=""), match="empty",
        input="name"),
    Row("FinetuneSaveCheckpoint-format-unknown", "FinetuneSaveCheckpoint", dict(format="ckpt"), match="ckpt",
        input="format"),
    Row("FinetuneSaveCheckpoint-dtype-unknown", "FinetuneSaveCheckpoint", dict(dtype="fp8"), match="fp8",
        input="dtype"),
    Row("FinetuneSaveCheckpoint-dtype-unknown-executor", "FinetuneSaveCheckpoint", dict(dtype="fp8"),
        via="executor", error=PromptValidationError, match="not one of the choices", input="dtype"),
    Row("FinetuneSaveCheckpoint-pipe-STRING", "FinetuneSaveCheckpoint", dict(pipe="a pipe"), match="pipe",
        input="pipe"),
    Row("FinetuneSaveCheckpoint-name-chinese-ok", "FinetuneSaveCheckpoint", dict(name="模型/检查点"), error=None,
        check=_saved("checkpoints", "模型/检查点.safetensors")),
]


# ============================================================================================== resources
class HugeAllocation(Exception):
    """Raised by the guard when the pack asks for a tensor or image far beyond what the tiny models need."""


class Hang(Exception):
    """Raised by the per-row alarm."""


def _numel(args) -> int:
    shape = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
    try:
        return math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return 0


@pytest.fixture
def guard(monkeypatch):
    """Fail fast (HugeAllocation / Hang) instead of allocating gigabytes or hanging the suite."""
    for name in ("randn", "rand", "zeros", "ones", "empty", "full"):
        real = getattr(torch, name)

        def make(real=real, name=name):
            def guarded(*args, **kwargs):
                if _numel(args) > MAX_TENSOR_ELEMENTS:
                    raise HugeAllocation(f"torch.{name}{tuple(args[:1]) if len(args) == 1 else args} asked for "
                                         f"{_numel(args):,} elements")
                return real(*args, **kwargs)
            return guarded

        monkeypatch.setattr(torch, name, make())
    real_resize, real_new = Image.Image.resize, Image.new

    def resize(self, size, *args, **kwargs):
        if int(size[0]) * int(size[1]) > MAX_IMAGE_PIXELS:
            raise HugeAllocation(f"PIL resize to {tuple(size)}")
        return real_resize(self, size, *args, **kwargs)

    def new(mode, size, *args, **kwargs):
        if int(size[0]) * int(size[1]) > MAX_IMAGE_PIXELS:
            raise HugeAllocation(f"PIL Image.new {tuple(size)}")
        return real_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    monkeypatch.setattr(Image, "new", new)

    def alarm(signum, frame):
        raise Hang(f"the row ran longer than {ROW_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(ROW_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _png(path: Path, color=(200, 30, 30), size=(48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _lora_for(handle, *, seed: int = 0, rank: int = 2) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, m in handle.base.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith(("to_q", "to_v")):
            out_f, in_f = m.weight.shape
            mods[("unet", path)] = LoraModule(torch.randn(rank, in_f, generator=g) * 0.1,
                                              torch.randn(out_f, rank, generator=g) * 0.1, alpha=float(rank))
    return LoraWeights(handle.family, mods, {}, f"bad-inputs-{handle.family.value}")


def _embedding_for(handle, name: str, *, width: int | None = None, n: int = 2) -> Embedding:
    widths = [int(te.config.hidden_size) for te in handle.base.text_encoders]
    vectors = {f"te{i + 1}": torch.randn(n, width or w) * 0.01 for i, w in enumerate(widths)}
    return Embedding(name=name, vectors=vectors)


class Resources:
    """Everything the rows refer to, in a private models/input/output folder configured as the host's."""

    def __init__(self, root: Path, session_models: Path, handles: dict) -> None:
        from comfy_finetune.nodes.data import TrainingData  # noqa: PLC0415

        self.root = root
        self.models = root / "models"
        self.input = root / "input"
        self.output = root / "output"
        for sub in ("checkpoints", "loras", "embeddings", "diffusers"):
            (self.models / sub).mkdir(parents=True)
        self.input.mkdir()
        self.output.mkdir()
        shutil.copytree(session_models / "diffusers" / "tiny-sd1", self.models / "diffusers" / "tiny-sd1")
        shutil.copytree(session_models / "diffusers" / "tiny-sd1", self.models / "diffusers" / "小模型")
        self.handles = handles
        sd1, xl = handles["sd1"], handles["sdxl"]

        # weights files
        (self.models / "checkpoints" / "bad_inputs").mkdir()
        corrupt = b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32", "shape": [1000000],' + b"\x00" * 30
        (self.models / "checkpoints" / "bad_inputs" / "corrupt.safetensors").write_bytes(corrupt)
        (self.models / "loras" / "bad_inputs").mkdir()
        (self.models / "loras" / "bad_inputs" / "corrupt.safetensors").write_bytes(corrupt)
        sd, meta = to_kohya_state_dict(_lora_for(xl), family=xl.family, unet_config=dict(xl.base.unet.config))
        save_file(sd, str(self.models / "loras" / "bad_inputs" / "kohya-sdxl.safetensors"), metadata=meta)
        (self.models / "loras" / "中文").mkdir()
        sd, meta = to_kohya_state_dict(_lora_for(sd1), family=sd1.family, unet_config=dict(sd1.base.unet.config))
        save_file(sd, str(self.models / "loras" / "中文" / "低秩.safetensors"), metadata=meta)
        emb = self.models / "embeddings"
        save_file({"emb_params": torch.randn(2, 7)}, str(emb / "bad_inputs_wide.safetensors"))
        xl_widths = [int(te.config.hidden_size) for te in xl.base.text_encoders]
        save_file({"clip_l": torch.randn(2, xl_widths[0]), "clip_g": torch.randn(2, xl_widths[1])},
                  str(emb / "bad_inputs_sdxl.safetensors"))
        (emb / "bad_inputs_corrupt.safetensors").write_bytes(corrupt)
        (emb / "嵌入").mkdir()
        widths = [int(te.config.hidden_size) for te in sd1.base.text_encoders]
        save_file({"emb_params": torch.randn(2, widths[0]) * 0.01}, str(emb / "嵌入" / "猫.safetensors"))

        # dataset folders
        bad = self.input / "bad_inputs"
        (bad / "empty").mkdir(parents=True)
        (bad / "captions_only").mkdir()
        (bad / "captions_only" / "a.txt").write_text("a caption without an image")
        _png(bad / "corrupt" / "good.png")
        (bad / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        _png(bad / "truncated" / "full.png")
        full = (bad / "truncated" / "full.png").read_bytes()
        _png(bad / "truncated" / "cut.png", color=(10, 200, 10), size=(64, 64))
        data = (bad / "truncated" / "cut.png").read_bytes()
        (bad / "truncated" / "cut.png").write_bytes(data[: len(data) // 2])
        assert full
        (bad / "not_an_image").mkdir()
        (bad / "not_an_image" / "fake.jpg").write_text("this is not a jpeg")
        enc = bad / "encodings"
        _png(enc / "a.png")
        (enc / "a.txt").write_bytes("一只猫 café".encode("utf-16"))
        _png(enc / "b.png", color=(0, 0, 200))
        (enc / "b.txt").write_bytes("café crème brûlée".encode("latin-1"))
        _png(enc / "c.png", color=(0, 200, 0))
        (enc / "c.txt").write_bytes(b"\xef\xbb\xbfplain ascii\r\n")
        zh = self.input / "数据集" / "圆圈"
        _png(zh / "红.png")
        (zh / "红.txt").write_text("红色的圆", encoding="utf-8")
        _png(zh / "蓝.png", color=(20, 20, 220))
        (zh / "蓝.txt").write_text("蓝色的圆", encoding="utf-8")

        self.previous = (host._settings.models_dir, host._settings.input_dir, host._settings.output_dir)
        host.configure(models_dir=self.models, input_dir=self.input, output_dir=self.output)

        from comfy_finetune.core.loading import load_base  # noqa: PLC0415

        # Kept alive so LoadBase in executor rows reuses the loaded weights instead of loading them per row.
        self.private_base = load_base("diffusers/tiny-sd1", "fp32", "cpu")
        self.values: dict[str, Any] = {
            "pipe:sd1": sd1, "pipe:sd2": handles["sd2"], "pipe:sdxl": xl,
            "dataset": TrainingData().run("[example] red-circle", resolution=64)[0],
            "dataset:chinese": TrainingData().run("数据集/圆圈", resolution=64)[0],
            "lora:sd1": _lora_for(sd1), "lora:sdxl": _lora_for(xl),
            "lora:empty": LoraWeights(sd1.family, {}, {}, "empty"),
            "embedding:sd1": _embedding_for(sd1, "bad-inputs"),
            "embedding:wide": _embedding_for(sd1, "bad-inputs-wide", width=7),
            "images": torch.rand(3, 48, 40, 3),
            "images:empty": torch.zeros(0, 48, 40, 3),
            "images:chw": torch.rand(3, 48, 40),
            "scorer:judge": JudgeScorer(target="green star", prompts=("a sks shape",), samples=1),
            "scorer:judge2": JudgeScorer(target="green star", prompts=("a sks shape", "a sks shape on a black "
                                                                       "background"), samples=1),
            "scorer:holdout-all": ValidationLossScorer(holdout_count=6),  # the red-circle set has 6 images
        }

    def close(self) -> None:
        host._settings.models_dir, host._settings.input_dir, host._settings.output_dir = self.previous

    def resolve(self, value: Any) -> Any:
        return self.values[value.key] if isinstance(value, Ref) else value


@pytest.fixture(scope="module")
def res(tmp_path_factory, models_dir, tiny_handles):
    r = Resources(tmp_path_factory.mktemp("bad_inputs"), models_dir, tiny_handles)
    try:
        yield r
    finally:
        r.close()


# ============================================================================================== running rows
HELPERS = {
    # link placeholder -> (helper node id, class_type, inputs, output slot)
    "pipe:sd1": ("1", "LoadBase", DEFAULTS["LoadBase"], 0),
    "dataset": ("2", "FinetuneTrainingData", DEFAULTS["FinetuneTrainingData"], 0),
    "link:images": ("2", "FinetuneTrainingData", DEFAULTS["FinetuneTrainingData"], 1),
}


def _api_prompt(row: Row, inputs: dict) -> dict:
    api: dict[str, dict] = {}
    node_inputs = {}
    for name, value in inputs.items():
        if isinstance(value, Ref):
            if value.key not in HELPERS:  # LoRA/embedding objects have no loader node: leave the input out
                continue
            nid, class_type, helper_inputs, slot = HELPERS[value.key]
            api[nid] = {"class_type": class_type, "inputs": dict(helper_inputs)}
            node_inputs[name] = [nid, slot]
        else:
            node_inputs[name] = value
    api["10"] = {"class_type": row.node, "inputs": node_inputs, "_meta": {"title": row.node}}
    return api


def _run(row: Row, res: Resources):
    inputs = {k: v for k, v in {**DEFAULTS[row.node], **row.inputs}.items() if k not in row.drop}
    if row.via == "executor":
        result = Executor(node_classes()).execute(_api_prompt(row, inputs), outputs=["10"])
        return result.outputs["10"]
    cls = node_classes()[row.node]
    out = getattr(cls(), cls.FUNCTION)(**{k: res.resolve(v) for k, v in inputs.items()})
    return out


def _params():
    params, seen = [], set()
    for row in ROWS:
        assert row.id not in seen, f"duplicate row id {row.id}"
        seen.add(row.id)
        marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {row.bug}")] if row.bug else []
        params.append(pytest.param(row, id=row.id, marks=marks))
    return params


@pytest.mark.parametrize("row", _params())
def test_bad_input(row: Row, res: Resources, guard):
    if row.error is None:
        out = _run(row, res)
        if row.check is not None:
            assert row.check(out, res) is not False, f"unexpected result: {out!r}"[:2000]
        return
    steps: list[int] = []

    def sink(event, data):
        if event == "comfy_finetune.train":
            steps.append(data.get("step"))

    host.add_event_sink(sink)
    try:
        with pytest.raises(row.error) as info:
            _run(row, res)
    finally:
        host._settings.event_sinks.remove(sink)
    msg = str(info.value)
    assert not (row.before_training and steps), f"refused only after training steps {steps}: {msg}"
    assert isinstance(info.value, FinetuneError), f"{type(info.value).__name__}: {msg}"
    assert row.node in msg, f"the message does not name the node {row.node}: {msg}"
    assert row.input is None or f"input '{row.input}'" in msg, f"the message does not name input '{row.input}': {msg}"
    assert "Fix:" in msg, f"the message has no 'Fix:': {msg}"
    if row.match:
        import re  # noqa: PLC0415

        assert re.search(row.match, msg, re.S), f"{row.match!r} not in: {msg}"


def test_every_node_has_rows():
    """The catalogue covers every node of the pack (by its current id), directly and through the executor."""
    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS, RENAMED_NODE_IDS  # noqa: PLC0415

    current = set(NODE_CLASS_MAPPINGS) - set(RENAMED_NODE_IDS)
    nodes = {r.node for r in ROWS}
    assert current <= nodes, current - nodes
    assert set(DEFAULTS) >= current
    via = {r.node for r in ROWS if r.via == "executor"}
    assert current - {"FinetuneSaveEmbedding"} <= via, current - via
    assert all(r.error is None or r.input for r in ROWS), "every error row names the input it expects"


def test_errors_are_workflow_errors_in_the_runner(res, tmp_path):
    """A hand-edited API prompt with an unknown sampler fails validation before anything runs."""
    from comfy_finetune.headless.runner import run_workflow  # noqa: PLC0415

    api = _api_prompt(Row("x", "Sample"), {**DEFAULTS["Sample"], "sampler_name": "warp_drive", "steps": 0})
    api["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    with pytest.raises(WorkflowError) as info:
        run_workflow(api)
    msg = str(info.value)
    assert "input 'sampler_name'" in msg and "input 'steps'" in msg and msg.count("Fix:") == 2


def test_nodes_accept_positional_arguments(res, guard):
    """A node is a Python class too: calling ``run`` positionally works like calling it with keywords."""
    sample = node_classes()["Sample"]()
    pipe = res.values["pipe:sd1"]
    by_name = sample.run(pipe=pipe, prompt="a red circle", seed=1, steps=1, cfg=1.0, sampler_name="euler",
                         scheduler="normal", width=64, height=64, batch_size=1)[0]
    by_position = sample.run(pipe, "a red circle", 1, 1, 1.0, "euler", "normal", 64, 64, 1)[0]
    assert torch.equal(by_name, by_position)


# ============================================================================================== AddLoRA: adapter kinds
# Files of the kinds Add LoRA applies beyond plain LoRA (LyCORIS LoHa / LoKr, DoRA) that are wrong in one way each:
# each is refused naming the node, the input and a fix, and the same node then loads a good file.
def _lycoris_for(handle, kind: str) -> LoraWeights:
    from comfy_finetune.core.adapters import LohaModule, LokrModule  # noqa: PLC0415

    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    mods = {}
    for path, m in handle.base.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith(("to_q", "to_v")):
            out_f, in_f = m.weight.shape
            if kind == "loha":
                mods[("unet", path)] = LohaModule(rnd(out_f, 2), rnd(2, in_f), rnd(out_f, 2), rnd(2, in_f), 2.0)
            else:
                mods[("unet", path)] = LokrModule(None, w1=rnd(2, 2), w2=rnd(out_f // 2, in_f // 2))
    return LoraWeights(handle.family, mods, {}, f"bad-inputs-{kind}")


def _kohya(lora: LoraWeights, handle) -> tuple[dict, dict]:
    return to_kohya_state_dict(lora, family=handle.family, unet_config=dict(handle.base.unet.config))


def _add_lora_refuses_then_works(res: Resources, name: str, sd: dict | None, meta: dict | None, match: str,
                                 data: bytes | None = None) -> str:
    path = res.models / "loras" / "bad_inputs" / name
    if data is not None:
        path.write_bytes(data)
    else:
        save_file(sd, str(path), metadata=meta)
    node = node_classes()["AddLoRA"]()
    sd1 = res.values["pipe:sd1"]
    try:
        with pytest.raises(FinetuneError) as info:
            node.run(pipe=sd1, lora_name=f"bad_inputs/{name}", strength_unet=1.0, strength_text=1.0)
    finally:
        path.unlink(missing_ok=True)
    msg = str(info.value)
    assert msg.startswith("[AddLoRA] input 'lora_name':") and "Fix:" in msg, msg
    import re  # noqa: PLC0415

    assert re.search(match, msg, re.S), f"{match!r} not in: {msg}"
    out = node.run(pipe=sd1, lora_name="中文/低秩.safetensors", strength_unet=1.0, strength_text=1.0)
    pipe = out["result"][0] if isinstance(out, dict) else out[0]
    assert len(pipe.loras) == 1 and len(pipe.loras[0].lora.modules) > 0  # the next run works
    return msg


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_add_lora_refuses_a_lycoris_file_for_another_family(res, guard, kind, metadata):
    sd, meta = _kohya(_lycoris_for(res.values["pipe:sdxl"], kind), res.values["pipe:sdxl"])
    match = "is for SDXL but the model is SD 1.x" if metadata else "does not fit the SD 1.x model"
    _add_lora_refuses_then_works(res, f"{kind}-sdxl.safetensors", sd, meta if metadata else {}, match)


def test_add_lora_refuses_a_lokr_whose_kron_product_does_not_fit_its_layer(res, guard):
    sd1 = res.values["pipe:sd1"]
    lora = _lycoris_for(sd1, "lokr")
    key = sorted(lora.modules)[0]
    module = lora.modules[key]
    module.w2 = torch.zeros(module.w2.shape[0], module.w2.shape[1] + 1)  # kron [out, in + 2]: not the layer's
    sd, meta = _kohya(lora, sd1)
    _add_lora_refuses_then_works(res, "lokr-misfit.safetensors", sd, meta,
                                 r"its factors do not fit the layers they name \(1 of \d+ modules, e\.g\. "
                                 r"lora_unet_.*: LoKr factors w1 \[2, 2\] and w2 \[\d+, \d+\] give a kron product "
                                 r"\[\d+, \d+\] vs model.*Fix: the file is damaged")


@pytest.mark.parametrize("shape", ["half-rows", "1-D"])
def test_add_lora_refuses_dora_magnitudes_that_do_not_fit_the_layer(res, guard, shape):
    sd1 = res.values["pipe:sd1"]
    sd, meta = _kohya(_lora_for(sd1), sd1)
    up = next(k for k in sorted(sd) if k.endswith(".lora_up.weight"))
    out_f = sd[up].shape[0]
    sd[up.replace(".lora_up.weight", ".dora_scale")] = torch.ones(out_f // 2, 1) if shape == "half-rows" \
        else torch.ones(out_f)
    _add_lora_refuses_then_works(res, f"dora-{shape}.safetensors", sd, meta,
                                 r"is a DoRA whose magnitudes do not fit its layer: dora_scale .* fits neither.*Fix:"
                                 r".*dora_scale is \[out, 1\]")


@pytest.mark.parametrize("marker", ["lycoris", "peft"])
def test_add_lora_refuses_a_file_marked_dora_without_magnitudes(res, guard, marker):
    sd1 = res.values["pipe:sd1"]
    sd, meta = _kohya(_lora_for(sd1), sd1)
    if marker == "lycoris":
        meta = {**meta, "ss_network_module": "lycoris.kohya",
                "ss_network_args": '{"algo": "lora", "dora_wd": "True"}'}
    else:
        meta = {**meta, "lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": true}'}
    _add_lora_refuses_then_works(res, f"dora-{marker}-no-magnitudes.safetensors", sd, meta,
                                 "marked as a DoRA .*holds no DoRA magnitudes.*Fix: re-export the DoRA")


def test_add_lora_refuses_a_truncated_lora_file(res, guard, tmp_path):
    sd1 = res.values["pipe:sd1"]
    sd, meta = _kohya(_lycoris_for(sd1, "loha"), sd1)
    full = tmp_path / "full.safetensors"
    save_file(sd, str(full), metadata=meta)
    data = full.read_bytes()
    _add_lora_refuses_then_works(res, "loha-truncated.safetensors", None, None,
                                 "not a valid safetensors file.*Fix: re-download", data=data[: len(data) * 3 // 5])
