"""Training inside a graph, with ComfyUI's execution semantics (inference mode, caching, save → load)."""

from __future__ import annotations

import torch

from comfy_finetune.headless.executor import Executor
from comfy_finetune.headless.runner import node_classes

TRAIN_INPUTS = dict(rank=4, alpha=4.0, targets="attention", train_text_encoder=False, text_learning_rate=5e-5,
                    steps=4, learning_rate=1e-3, batch_size=2, grad_accum=1, lr_schedule="constant", warmup_steps=0,
                    optimizer="adamw", precision="fp32", gradient_checkpointing=False, min_snr_gamma=0.0,
                    noise_offset=0.0, seed=0)
SAMPLE_INPUTS = dict(prompt="a photo of a red circle", seed=1, steps=2, cfg=5.0, sampler_name="euler",
                     scheduler="normal", width=64, height=64, batch_size=1)


def graph(seed: int = 1) -> dict:
    return {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "diffusers/tiny-sd1", "dtype": "fp32",
                                                   "device": "cpu"}},
        "2": {"class_type": "FinetuneTrainingData", "inputs": {"folder": "[example] red-circle", "resolution": 64,
                                                               "crop": "center", "flip": False, "repeats": 1,
                                                               "caption_prefix": "", "caption_dropout": 0.0,
                                                               "bucketing": False}},
        "3": {"class_type": "FinetuneTrainLoRA", "inputs": {"pipe": ["1", 0], "dataset": ["2", 0], **TRAIN_INPUTS}},
        "4": {"class_type": "AddLoRA", "inputs": {"pipe": ["1", 0], "lora_name": "None", "strength_unet": 1.0,
                                                  "strength_text": 1.0, "lora": ["3", 0]}},
        "5": {"class_type": "Sample", "inputs": {"pipe": ["4", 0], **SAMPLE_INPUTS, "seed": seed}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "graph/lora"}},
        "7": {"class_type": "FinetuneSaveLoRA", "inputs": {"lora": ["3", 0], "pipe": ["1", 0],
                                                           "name": "graph/trained", "layout": "kohya",
                                                           "overwrite": True}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }


def test_train_in_graph_then_sample_and_cache(models_dir):
    ex = Executor(node_classes())  # runs node functions under torch.inference_mode(), like ComfyUI
    first = ex.execute(graph(seed=1))
    assert "3" in first.executed
    image = first.outputs["5"][0]
    assert image.shape == (1, 64, 64, 3)
    assert (models_dir / "loras" / "graph" / "trained.safetensors").exists()
    # only a sampling widget changes: training is cached, sampling re-runs
    second = ex.execute(graph(seed=2))
    assert not {"1", "2", "3"} & set(second.executed), "training must not re-run when only sampling changed"
    assert "5" in second.executed
    assert not torch.equal(second.outputs["5"][0], image)


def test_saved_lora_reproduces_the_in_graph_result(models_dir):
    ex = Executor(node_classes())
    in_graph = ex.execute(graph(seed=3)).outputs["5"][0]
    from_file = {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "diffusers/tiny-sd1", "dtype": "fp32",
                                                   "device": "cpu"}},
        "4": {"class_type": "AddLoRA", "inputs": {"pipe": ["1", 0], "lora_name": "graph/trained.safetensors",
                                                  "strength_unet": 1.0, "strength_text": 1.0}},
        "5": {"class_type": "Sample", "inputs": {"pipe": ["4", 0], **SAMPLE_INPUTS, "seed": 3}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "graph/file"}},
    }
    reloaded = Executor(node_classes()).execute(from_file).outputs["5"][0]
    assert torch.allclose(in_graph, reloaded, atol=1e-5)
