"""The memory estimate before training (training/memory.py): close to the measured peak, refuses a run that will
not fit before any step with the settings that would fit, and those settings really fit by the estimate."""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.headless.executor import Executor
from comfy_finetune.headless.runner import node_classes
from comfy_finetune.training import memory
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.frame import prepared
from comfy_finetune.training.loop import train
from comfy_finetune.training.lora_trainer import LoraObjective, LoraSpec
from comfy_finetune.training.settings import TrainSettings

STRIPED = Path(__file__).resolve().parents[1] / "example_data" / "striped-style"


def _settings(**kw) -> TrainSettings:
    base = dict(steps=1, learning_rate=1e-3, batch_size=4, precision="fp32", gradient_checkpointing=False)
    fields = TrainSettings.__dataclass_fields__
    if "cache_to_disk" in fields:
        base["cache_to_disk"] = False
    base.update(kw)
    return TrainSettings(**base)


def test_sizes_and_free_memory(monkeypatch):
    assert memory.parse_bytes("4GB") == 4_000_000_000 and memory.parse_bytes("512MiB") == 512 * 2**20
    assert memory.parse_bytes("1000") == 1000
    with pytest.raises(FinetuneError) as err:
        memory.parse_bytes("lots")
    assert err.value.input == memory.FREE_MEMORY_ENV
    assert memory.free_memory(torch.device("cpu")) > 0
    monkeypatch.setenv(memory.FREE_MEMORY_ENV, "3GB")
    assert memory.free_memory(torch.device("cpu")) == 3_000_000_000


def test_activation_probe_counts_what_autograd_keeps(tiny_handles, one_thread):
    """The meta-device probe's saved bytes match the real model's saved tensors on a forward pass."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    unet = type(tiny_handles["sd1"].base.unet).from_config(tiny_handles["sd1"].base.unet.config)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                            unet, adapter_name="t")
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    names = frozenset(n for n, m in unet.named_modules() if isinstance(m, LoraLayer))
    probe = memory.probe_activations(unet, "lora", names, False, 128, 128)

    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
    real = sum(kept.values())
    assert 0.8 < probe.plain / real < 1.25, (probe.plain, real)
    assert probe.checkpointed < 0.6 * probe.plain  # checkpointing keeps far less
    # twice the pixels: about twice the activations (no n^2 attention matrix: SDPA is fused)
    big = memory.probe_activations(unet, "lora", names, False, 256, 256)
    assert 3.5 < big.plain / probe.plain < 4.5


def _rss(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_estimate_is_close_to_the_measured_peak(tiny_handles, one_thread, capsys):
    """CPU: the estimated growth over the loaded model vs the measured peak RSS growth of a one-step run on the
    tiny SD 1.x model (256 px, batch 2); 0.76-1.0x in the calibration runs (module doc), asserted within 2x."""
    handle = tiny_handles["sd1"]

    def run_once(resolution: int) -> tuple[memory.Estimate, int]:
        dataset = prepare(read_folder(STRIPED), resolution=resolution)
        settings = _settings(batch_size=2)
        objective = LoraObjective(handle, dataset, settings, LoraSpec(rank=4, alpha=4.0), node="TrainLoRA")
        with prepared(objective, handle, settings, node="TrainLoRA") as run:
            work = memory.describe(objective.workload(), objective.param_groups(), torch.device("cpu"))
            est = memory.estimate(work, memory.current_choice(work, settings))
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS: growth is real allocation
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            before = _rss("VmRSS")
            train(run, lambda first: dataset.batches(settings.batch_size, settings.seed, first), settings,
                  node="TrainLoRA", device=torch.device("cpu"))
            grown = _rss("VmHWM") - before
        return est, grown

    run_once(64)  # warm-up: one-time allocations of the libraries are not the run's
    est, grown = run_once(256)
    predicted = est.total - est.weights
    ratio = predicted / grown
    with capsys.disabled():
        print(f"\nmemory estimate: {predicted / 1e6:.0f} MB estimated, "
              f"{grown / 1e6:.0f} MB measured, ratio {ratio:.2f}")
    assert 0.5 < ratio < 2.0, (predicted, grown, est.parts())


def test_suggested_settings_fit_and_are_the_cheapest(tiny_handles, one_thread):
    handle = tiny_handles["sd1"]
    dataset = prepare(read_folder(STRIPED), resolution=384)
    settings = _settings(batch_size=8, grad_accum=1)
    objective = LoraObjective(handle, dataset, settings, LoraSpec(rank=4, alpha=4.0), node="TrainLoRA")
    with prepared(objective, handle, settings, node="TrainLoRA"):
        work = memory.describe(objective.workload(), objective.param_groups(), torch.device("cpu"))
        now = memory.current_choice(work, settings)
        need_now = memory.estimate(work, now).total - work.weight_bytes
        ckpt_only = memory.estimate(work, memory.Choice(8, True, "fp32", "adamw", 384, 384)).total - work.weight_bytes
        assert ckpt_only < need_now
        budget = (ckpt_only + need_now) / 2  # checkpointing alone fits; nothing is needed beyond it
        changes, choice, need = memory.suggest(work, now, budget)
        changes_one = changes
        # one change of the cheapest kind fits (checkpointing, or bf16 autocast: both only cost speed/precision)
        assert len(changes) == 1 and changes[0] in ("gradient_checkpointing on", "precision bf16"), changes
        assert need <= budget and memory.estimate(work, choice).total - work.weight_bytes <= budget
        # a tighter budget: more changes, still fitting by the estimator, batch changes keep the effective batch
        budget = memory.estimate(work, memory.Choice(1, True, "bf16", "adamw", 384, 384)).total - work.weight_bytes
        changes, choice, need = memory.suggest(work, now, budget * 1.01)
        assert memory.estimate(work, choice).total - work.weight_bytes <= budget * 1.01
        assert any("grad_accum" in c for c in changes if c.startswith("batch_size"))
        cheaper = [cost for cost, alt, _ in memory.alternatives(work, now)
                   if memory.estimate(work, alt).total - work.weight_bytes <= budget * 1.01]
        best_cost = min(cheaper)
        chosen_cost = next(cost for cost, alt, ch in memory.alternatives(work, now) if alt == choice)
        assert chosen_cost == best_cost
        # the error names the node, the input of the first change and the changes with their estimate
        with pytest.raises(FinetuneError) as err:
            memory.check(objective.workload(), objective.param_groups(), settings, node="TrainLoRA",
                         device=torch.device("cpu"),
                         free_bytes=int((ckpt_only + need_now) / 2 / memory.USABLE))
        assert err.value.node == "TrainLoRA" and err.value.input in ("gradient_checkpointing", "precision")
        assert err.value.fix.startswith(f"{changes_one[0]}: estimated")
        assert "free" in str(err.value) and "batch_size 8" in err.value.detail


def _graph(name: str) -> dict:
    return {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "diffusers/tiny-sd1", "dtype": "fp32",
                                                   "device": "cpu"}},
        "2": {"class_type": "FinetuneTrainingData", "inputs": {"folder": "[example] red-circle", "resolution": 64,
                                                               "crop": "center", "flip": False, "repeats": 1,
                                                               "caption_prefix": "", "caption_dropout": 0.0,
                                                               "bucketing": False}},
        "3": {"class_type": "FinetuneTrainLoRA", "inputs": {
            "pipe": ["1", 0], "dataset": ["2", 0], "rank": 4, "alpha": 4.0, "targets": "attention",
            "train_text_encoder": False, "text_learning_rate": 5e-5, "steps": 3, "learning_rate": 1e-3,
            "batch_size": 2, "grad_accum": 1, "lr_schedule": "constant", "warmup_steps": 0, "optimizer": "adamw",
            "precision": "fp32", "gradient_checkpointing": False, "min_snr_gamma": 0.0, "noise_offset": 0.0,
            "seed": 11, "save_every": 1}},
        "4": {"class_type": "FinetuneSaveLoRA", "inputs": {"lora": ["3", 0], "pipe": ["1", 0], "name": name,
                                                           "layout": "kohya", "overwrite": False}},
    }


def test_a_run_that_cannot_fit_fails_before_the_first_step(models_dir, tiny_handles, monkeypatch, one_thread):
    events = []
    # a listener for this test only (monkeypatch puts the host's list back after it)
    monkeypatch.setattr(host._settings, "event_sinks", [*host._settings.event_sinks,
                                                        lambda event, data: events.append(event)])
    checkpoints = host.output_dir() / "finetune_checkpoints"
    before = set(checkpoints.glob("*")) if checkpoints.exists() else set()
    monkeypatch.setenv(memory.FREE_MEMORY_ENV, "1MB")
    with pytest.raises(FinetuneError) as err:
        Executor(node_classes()).execute(_graph("memtest/never"))
    exc = err.value
    assert "FinetuneTrainLoRA" in exc.node and "not enough memory (RAM)" in exc.detail and "1 MB free" in exc.detail
    # the fix names settings that fit by the estimate (here: loading the frozen model in 16 bit frees more than
    # the run needs), or says that nothing does
    assert "MB of 1 MB free" in exc.fix or "leanest" in exc.fix, exc.fix
    assert not [e for e in events if e.startswith("comfy_finetune.train")], "no step may run"
    assert (set(checkpoints.glob("*")) if checkpoints.exists() else set()) == before, "no checkpoint written"
    assert not (models_dir / "loras" / "memtest").exists()
    # the base model is left as it was (adapters detached) and the same run trains with the check off
    monkeypatch.setenv(memory.CHECK_ENV, "off")
    Executor(node_classes()).execute(_graph("memtest/ok"))
    assert (models_dir / "loras" / "memtest" / "ok.safetensors").exists()
    assert [e for e in events if e == "comfy_finetune.train"]
    monkeypatch.delenv(memory.CHECK_ENV)
    monkeypatch.delenv(memory.FREE_MEMORY_ENV)
    assert os.environ.get(memory.FREE_MEMORY_ENV) is None


# Issue targets (real-size estimates, GB) and the options each needs
TARGETS = [(("sd15", "lora", 512, 1, True, "bf16", "adamw", ("fp8",)), 2.5),
           (("sdxl", "lora", 1024, 1, True, "bf16", "adamw", ("fp8",)), 8.0),
           (("sdxl", "lora", 1024, 1, True, "bf16", "adamw", ("stream", "offload")), 4.0),
           (("sd15", "full", 512, 1, True, "bf16", "adamw8bit", ("fused", "offload")), 8.0)]


def test_real_size_targets_with_the_options_they_name(one_thread):
    rows = memory.real_size_estimates([case for case, _ in TARGETS], kolors=False)
    plain = memory.real_size_estimates([case[:-1] + ((),) for case, _ in TARGETS], kolors=False)
    for (case, target), row, base in zip(TARGETS, rows, plain):
        assert row["peak_gb"] <= target, (case, row["peak_gb"], row["parts"])
        assert row["peak_gb"] < base["peak_gb"] - 0.5, (case, row["peak_gb"], base["peak_gb"])  # the option saves
        assert row.get("encode_peak_gb", 0) <= target  # the first run's encoding fits too
    assert [r["options"] for r in rows][-1] == ["fused_step", "offload_frozen"]
