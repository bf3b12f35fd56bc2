"""Soak tests (issue 7, item 6): many sampling and short training runs in one process stay flat in memory and handles.

Marked slow: skipped unless pytest runs with ``--run-slow``. Sizes can be raised with FT_SOAK_SAMPLES /
FT_SOAK_TRAINS. Memory is the resident set size (VmRSS in /proc/self/status) after ``gc.collect()`` and
``malloc_trim(0)`` (so free allocator pages do not count), sampled every few runs after a warm-up; growth per 100
runs is the least-squares slope over those samples, relative to the RSS after the warm-up. Open files are the
entries of /proc/self/fd.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time

import pytest

from comfy_finetune import host

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")]

SAMPLE_RUNS = int(os.environ.get("FT_SOAK_SAMPLES", "300"))
TRAIN_RUNS = int(os.environ.get("FT_SOAK_TRAINS", "40"))
SAMPLE_LIMIT_PCT = 1.0  # growth per 100 sampling runs (issue 7 target)
TRAIN_LIMIT_PCT = 5.0  # growth per 100 training runs (loose: optimizer/peft allocations are bigger and noisier)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle() -> None:
    gc.collect()
    if os.environ.get("FT_SOAK_TRIM", "1") == "0":  # FT_SOAK_TRIM=0: raw RSS, allocator slack included
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def slope_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (run, MiB) in MiB per 100 runs."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


class Meter:
    """RSS/fd samples after a warm-up; reports and checks growth."""

    def __init__(self, name: str, every: int) -> None:
        self.name, self.every = name, every
        self.points: list[tuple[int, float]] = []
        self.fds: list[tuple[int, int]] = []
        self.t0 = time.perf_counter()

    def sample(self, run: int, force: bool = False) -> None:
        if force or run % self.every == 0:
            settle()
            self.points.append((run, rss_mib()))
            self.fds.append((run, open_fds()))

    def report(self, capsys) -> tuple[float, float]:
        base = self.points[0][1]
        slope = slope_per_100(self.points)
        pct = 100 * slope / base
        by_100 = [f"{r}: {m:.1f}" for r, m in self.points if r % 100 == 0 or r == self.points[-1][0]]
        with capsys.disabled():
            print(f"\n[soak] {self.name}: {self.points[-1][0]} runs after warm-up in "
                  f"{time.perf_counter() - self.t0:.1f} s; RSS MiB after warm-up {base:.1f}, at runs "
                  f"{', '.join(by_100)}; growth {slope:+.2f} MiB ({pct:+.3f} %) per 100 runs (least squares over "
                  f"{len(self.points)} samples), end - start {self.points[-1][1] - base:+.2f} MiB; open fds "
                  f"{self.fds[0][1]} -> {self.fds[-1][1]} (max {max(f for _, f in self.fds)})")
        return slope, pct


@pytest.fixture
def soak_output(models_dir, tmp_path):
    old = host._settings.output_dir
    host.configure(output_dir=tmp_path / "output")
    try:
        yield tmp_path / "output"
    finally:
        host._settings.output_dir = old


def test_sampling_soak(tiny_handles, soak_output, capsys):
    """SAMPLE_RUNS workflows (LoadBase -> [AddLoRA] -> Sample 64 px, 2 steps -> SaveImage) through one executor."""
    from comfy_finetune.headless.executor import Executor  # noqa: PLC0415
    from comfy_finetune.headless.runner import node_classes  # noqa: PLC0415

    executor = Executor(node_classes())
    handle = tiny_handles["sd1"]  # keeps the loaded weights alive, so LoadBase reuses them

    def prompt(i: int) -> dict:
        api = {
            "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "diffusers/tiny-sd1", "dtype": "fp32",
                                                       "device": "cpu"}},
            "2": {"class_type": "NegativePrompt", "inputs": {"text": f"blurry {i % 7}"}},
            "3": {"class_type": "Sample", "inputs": {"pipe": ["1", 0], "negative": ["2", 0],
                                                     "prompt": f"a red circle, variant {i}", "seed": i, "steps": 2,
                                                     "cfg": 5.0, "sampler_name": ("euler", "dpmpp_2m", "ddim")[i % 3],
                                                     "scheduler": "normal", "width": 64, "height": 64,
                                                     "batch_size": 1}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "soak/img"}},
        }
        return api

    warmup = 20
    for i in range(warmup):
        executor.execute(prompt(100_000 + i))
    meter = Meter("sampling", every=10)
    meter.sample(0, force=True)
    for i in range(1, SAMPLE_RUNS + 1):
        result = executor.execute(prompt(i))
        assert "3" in result.executed
        meter.sample(i)
    assert len(list((soak_output / "soak").glob("*.png"))) == warmup + SAMPLE_RUNS
    assert handle.base is not None
    slope, pct = meter.report(capsys)
    assert pct < SAMPLE_LIMIT_PCT, f"RSS grows {pct:.3f} % per 100 sampling runs (limit {SAMPLE_LIMIT_PCT} %)"
    assert meter.fds[-1][1] <= meter.fds[0][1] + 2, f"file descriptors leak: {meter.fds[0]} -> {meter.fds[-1]}"


def test_training_soak(tiny_handles, soak_output, capsys):
    """TRAIN_RUNS TrainLoRA runs of 2 steps (node calls), each followed by a sample with the trained LoRA."""
    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS as N  # noqa: PLC0415

    pipe = tiny_handles["sd1"]
    dataset = N["FinetuneTrainingData"]().run("[example] red-circle", resolution=64)[0]
    trainer, sampler = N["FinetuneTrainLoRA"](), N["Sample"]()
    common = dict(steps=2, learning_rate=1e-4, batch_size=2, grad_accum=1, lr_schedule="constant", warmup_steps=0,
                  optimizer="adamw", precision="fp32", gradient_checkpointing=False, min_snr_gamma=0.0,
                  noise_offset=0.0)

    def run(i: int) -> None:
        lora, trained, plot, grid = trainer.run(pipe=pipe, dataset=dataset, rank=4, alpha=4.0,
                                                targets="attention+feedforward", train_text_encoder=i % 2 == 0,
                                                text_learning_rate=5e-5, seed=i, **common)
        images = sampler.run(pipe=trained, prompt="a red circle", seed=i, steps=2, cfg=5.0, sampler_name="euler",
                             scheduler="normal", width=64, height=64, batch_size=1)[0]
        assert images.shape == (1, 64, 64, 3) and plot.ndim == 4

    warmup = 4
    for i in range(warmup):
        run(100_000 + i)
    meter = Meter("training", every=5)
    meter.sample(0, force=True)
    for i in range(1, TRAIN_RUNS + 1):
        run(i)
        meter.sample(i)
    slope, pct = meter.report(capsys)
    assert pct < TRAIN_LIMIT_PCT, f"RSS grows {pct:.3f} % per 100 training runs (limit {TRAIN_LIMIT_PCT} %)"
    assert meter.fds[-1][1] <= meter.fds[0][1] + 2, f"file descriptors leak: {meter.fds[0]} -> {meter.fds[-1]}"
    checkpoints = soak_output / "finetune_checkpoints"
    assert not (checkpoints.exists() and any(checkpoints.iterdir())), "finished runs must leave no checkpoint files"


def test_meter_detects_a_leak(capsys):
    """Control: the same measurement sees 0.5 MiB kept per run as about 50 MiB per 100 runs, and a leaked fd."""
    kept, files = [], []
    meter = Meter("control (leaks 0.5 MiB and one fd per 10 runs)", every=10)
    meter.sample(0, force=True)
    try:
        for i in range(1, 201):
            kept.append(bytearray(os.urandom(512 * 1024)))
            if i % 10 == 0:
                files.append(open(os.devnull, "rb"))  # noqa: SIM115 - the leak under test
            meter.sample(i)
        slope, pct = meter.report(capsys)
        assert 40 < slope < 60, slope
        assert meter.fds[-1][1] >= meter.fds[0][1] + 20
    finally:
        for f in files:
            f.close()
