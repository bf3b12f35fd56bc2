"""The benchmark suite: training and sampling speed, FLOPs utilisation and peak memory, in one command.

    python benchmarks/suite.py [--device cpu|cuda] [--models tiny,small,sd15,sdxl] [--json out.json] [--quick]

Models: ``tiny`` / ``tinyxl`` (core/tiny.py SD 1.x / SDXL), ``small`` (SD 1.5 layout at ~1/10 width) and the
real-size ``sd15`` / ``sdxl`` architectures from ``configs/`` with random weights (core/realsize.py; nothing is
downloaded). The CPU default is tiny + small at scaled sizes so it finishes in a few minutes; on a GPU the default
is sd15 + sdxl at 512 / 1024 px.

Every case runs the pack's own code (training/* trainers through run_training and the shared loop;
core/sampling.py for sampling) in a fresh subprocess, so peak memory does not mix between cases:

* **train** (LoRA, full DreamBooth, Textual Inversion): seconds per optimizer step (median time between the loop's
  progress events after a warm-up), images/s, peak memory (CUDA: ``max_memory_allocated``, weights included; CPU:
  peak RSS growth over the loaded model), and model FLOPs utilisation = FLOPs of one step / step time / the device's
  matmul rate. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` as the difference between a 2-step
  and a 1-step run (so one-off encoding and setup cancel), counted without gradient checkpointing (model FLOPs,
  not the recomputation).
* **sample**: denoising steps/s of ``core.sampling.sample`` against a plain diffusers pipeline built from the same
  modules, same scheduler, prompt, cfg, size, batch and initial noise, alternated in the same process; MFU the same
  way.
* the matmul rate (bf16 on CUDA, fp32 on CPU) is measured at the start of the same run and again in each case's
  process; real-size SD 1.5 / SDXL step FLOPs are counted on the meta device;
* with ``tiny`` on the CPU, the graph/patch overhead ratios of ``sample_overhead.py`` and ``train_overhead.py``
  (target <= 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_SIZES = {"tiny": 64, "tinyxl": 64, "small": 128, "sd15": 256, "sdxl": 512}  # scaled: a CPU run stays short
GPU_SIZES = {"tiny": 64, "tinyxl": 64, "small": 256, "sd15": 512, "sdxl": 1024}
SD15_LIKE = ("tiny", "small", "sd15")


# ---------------------------------------------------------------------------------------------- plan
def plan(models: list[str], device: str, quick: bool) -> list[dict]:
    cuda = device.startswith("cuda")
    cases: list[dict] = []
    for m in models:
        size = (GPU_SIZES if cuda else CPU_SIZES)[m]
        prec = "bf16" if cuda else "fp32"
        steps = 10 if cuda else (10 if m.startswith("tiny") else 3)
        batches = (1, 8) if not quick else (1,)
        for b in batches:
            for gc in (False, True):
                cases.append(dict(kind="lora", model=m, size=size, batch=b, precision=prec, gc=gc, steps=steps))
        if cuda:
            cases.append(dict(kind="lora", model=m, size=size, batch=1, precision="fp16", gc=True, steps=steps))
            # the small-GPU setting: checkpointing, everything cached, VAE and text encoders on the CPU
            cases.append(dict(kind="lora", model=m, size=size, batch=1, precision=prec, gc=True, steps=steps,
                              offload=True))
            # the memory options, each beside the plain row above for its step-time ratio and peak: the frozen UNet
            # in float8, then streamed layer by layer (with the encoders offloaded)
            cases.append(dict(kind="lora", model=m, size=size, batch=1, precision=prec, gc=True, steps=steps,
                              fp8=True))
            cases.append(dict(kind="lora", model=m, size=size, batch=1, precision=prec, gc=True, steps=steps,
                              offload=True, stream=True))
            if not m.startswith("tiny"):
                cases.append(dict(kind="lora", model=m, size=size, batch=8, precision=prec, gc=False, steps=steps,
                                  compile=True))
        if m in SD15_LIKE:
            cases.append(dict(kind="dreambooth", model=m, size=size, batch=1, precision=prec, gc=True, steps=steps,
                              optimizer="adamw8bit" if cuda and _has("bitsandbytes") else "adamw"))
            if cuda:  # the full-DreamBooth target's setting: fused step, 8-bit Adam, frozen parts on the CPU
                cases.append(dict(kind="dreambooth", model=m, size=size, batch=1, precision=prec, gc=True,
                                  steps=steps, fused=True, offload=True,
                                  optimizer="adamw8bit" if _has("bitsandbytes") else "adamw"))
            cases.append(dict(kind="ti", model=m, size=size, batch=1, precision=prec, gc=False, steps=steps))
        sample_steps = 20 if cuda else (10 if m.startswith("tiny") else 4)
        for b in batches:
            cases.append(dict(kind="sample", model=m, size=size, batch=b, precision=prec, steps=sample_steps))
    return cases


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Memory:
    """Peak memory from ``start()``: CUDA allocator peak (weights included), or CPU peak RSS growth."""

    def __init__(self, device) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss("VmRSS")
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def result(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"peak_mib": peak / 2**20, "model_mib": self.base / 2**20, "growth_mib": (peak - self.base) / 2**20}
        return {"growth_mib": (_rss("VmHWM") - self.base) / 2**20}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(device, seconds: float = 3.0) -> dict:
    """Dense matmul FLOP/s of the device: bf16 8192^3 on CUDA, fp32 2048^3 on the CPU; the best of the timed runs
    (the rate the device reaches, not one slowed by another process)."""
    import torch

    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 5:
        reps = 10 if cuda else 1
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t))
    return {"flops_per_s": max(rates), "median_flops_per_s": statistics.median(rates),
            "dtype": str(dtype).replace("torch.", ""), "n": n}


def real_size_flops(models=("sd15", "sdxl"), batches=(1, 8)) -> dict:
    """FLOPs of one LoRA training step (UNet forward + backward, rank 16, attention + feed-forward) and of one
    UNet forward, for the real-size UNets at their native sizes, counted on the meta device (no memory, no
    compute: seconds on any machine). What the GPU targets' MFU refers to."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from comfy_finetune.core.realsize import NATIVE_SIZE, load_configs
    from comfy_finetune.training.lora_trainer import UNET_TARGETS

    out = {}
    for name in models:
        cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in load_configs(name)["unet"].items()
               if not k.startswith("_")}
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=list(UNET_TARGETS[
            "attention+feedforward"])), unet)
        for n, p in unet.named_parameters():
            p.requires_grad_("lora_" in n)
        size = NATIVE_SIZE[name]
        for b in batches:
            x = torch.randn(b, 4, size // 8, size // 8, device="meta")
            ctx = torch.randn(b, 77, cfg["cross_attention_dim"], device="meta")
            added = None
            if cfg.get("addition_embed_type") == "text_time":
                pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
                added = {"text_embeds": torch.randn(b, pooled, device="meta"),
                         "time_ids": torch.randn(b, 6, device="meta")}
            t = torch.zeros(b, dtype=torch.long, device="meta")
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                pred = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
                forward = counter.get_total_flops()
                pred.float().pow(2).mean().backward()
            out[f"{name} {size}px b{b}"] = {"unet_forward_flops": int(forward),
                                            "lora_step_flops": int(counter.get_total_flops())}
    return out


def environment(device) -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "python": platform.python_version(),
           "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "device": str(device), "bitsandbytes": _has("bitsandbytes")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return env


# ---------------------------------------------------------------------------------------------- one case (child)
def _quiet_libraries() -> None:
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def _handle(model: str, precision: str, device: str, tmp: Path):
    import torch

    from comfy_finetune import host

    host.configure(models_dir=tmp / "models", output_dir=tmp / "out", progress=False)
    os.environ["COMFY_FINETUNE_CACHE"] = str(tmp / "cache")
    dtype = "bf16" if precision == "bf16" else "fp16" if precision == "fp16" else "fp32"
    with torch.inference_mode(False):
        if model in ("tiny", "tinyxl"):
            from comfy_finetune.core.handle import ModelHandle
            from comfy_finetune.core.loading import load_diffusers_folder, resolve_dtype
            from comfy_finetune.core.tiny import build_tiny_pipeline_folder

            family = "sdxl" if model == "tinyxl" else "sd1"
            folder = build_tiny_pipeline_folder(tmp / "models" / "diffusers" / f"tiny-{family}", family, seed=0)
            dev = torch.device(device)
            return ModelHandle(load_diffusers_folder(folder, resolve_dtype(dtype, dev), dev))
        from comfy_finetune.core.realsize import build_base

        return build_base(model, dtype, device)


def _dataset(size: int, n: int):
    import torch

    from comfy_finetune.training.data import from_image_batch

    images = torch.rand((n, size, size, 3), generator=torch.Generator().manual_seed(0))
    captions = [f"a photo of a red circle number {i}" for i in range(n)]
    return from_image_batch(images, captions, resolution=size)


def _train_fn(case: dict, handle, data):
    from comfy_finetune.training.settings import TrainSettings

    kind = case["kind"]

    def run(steps: int, checkpointing: bool, compiled: bool | None = None):
        settings = TrainSettings(steps=steps, learning_rate=1e-5 if kind == "dreambooth" else 1e-4,
                                 batch_size=case["batch"], precision=case["precision"],
                                 gradient_checkpointing=checkpointing, optimizer=case.get("optimizer", "adamw"),
                                 cache_to_disk=False,
                                 compile=case.get("compile", False) if compiled is None else compiled,
                                 offload_frozen=case.get("offload", False), fp8_base=case.get("fp8", False),
                                 offload_unet="on" if case.get("stream") else "off",
                                 fused_step="on" if case.get("fused") else "off", seed=0)
        if kind == "lora":
            from comfy_finetune.training.lora_trainer import LoraSpec, train_lora

            return train_lora(handle, data, settings, LoraSpec(rank=16, alpha=16, targets="attention+feedforward"))
        if kind == "dreambooth":
            from comfy_finetune.training.dreambooth import DreamBoothSpec, train_dreambooth

            spec = DreamBoothSpec(instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                                  prior_preservation=False, method="full")
            return train_dreambooth(handle, data, settings, spec)
        from comfy_finetune.training.ti_trainer import TISpec, train_embedding

        return train_embedding(handle, data, settings, TISpec(token="<sks-thing>", initializer="thing",
                                                              num_vectors=2, templates="object"))
    return run


def run_train_case(case: dict, handle, device) -> dict:
    import torch

    from comfy_finetune import host

    # exactly one batch of images: every latent and caption is encoded in the first (warm-up) step, so the timed
    # steps and the FLOP difference below are training steps only (no VAE encode of a not-yet-seen image)
    data = _dataset(case["size"], case["batch"])
    run = _train_fn(case, handle, data)
    stamps: dict[int, float] = {}

    def sink(event: str, payload: dict) -> None:
        if event == "comfy_finetune.train":
            stamps[int(payload["step"])] = time.perf_counter()

    host.add_event_sink(sink)
    warm, n = 2 if not case.get("compile") else 3, case["steps"]
    mem = Memory(device)
    mem.start()
    run(warm + n, case["gc"])
    memory = mem.result()
    # median of the per-step times after the warm-up: robust to a step slowed by another process
    step_s = statistics.median(stamps[i + 1] - stamps[i] for i in range(warm, warm + n))
    # model FLOPs: eager (compiling under the counter would only add compile time), no checkpointing
    flops = count_flops(lambda: run(2, False, False)) - count_flops(lambda: run(1, False, False))
    del torch
    return {"step_s": step_s, "images_per_s": case["batch"] / step_s, "flops_per_step": flops, **memory}


def _pipeline(handle):
    import diffusers
    from diffusers import EulerDiscreteScheduler

    from comfy_finetune.core.families import Family

    base = handle.base
    sched = EulerDiscreteScheduler.from_config({**base.scheduler_config, "timestep_spacing": "linspace"})
    parts = dict(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
                 scheduler=sched)
    if base.family is Family.SDXL:
        return diffusers.StableDiffusionXLPipeline(text_encoder_2=base.text_encoders[1],
                                                   tokenizer_2=base.tokenizers[1], force_zeros_for_empty_prompt=False,
                                                   **parts)
    return diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **parts)


def run_sample_case(case: dict, handle, device, repeats: int | None = None) -> dict:
    import torch

    from comfy_finetune.core.sampling import SampleSettings, comfy_noise, sample

    size, b = case["size"], case["batch"]
    prompt = "a photo of a red circle"
    pipe = _pipeline(handle)
    pipe.set_progress_bar_config(disable=True)
    latent_shape = (b, 4, size // 8, size // 8)

    def ours(steps: int):
        return sample(handle, SampleSettings(prompt=prompt, steps=steps, cfg=7.0, width=size, height=size,
                                             batch_size=b, seed=0))

    def theirs(steps: int):
        with torch.inference_mode():
            kwargs = {"original_size": (size, size), "target_size": (size, size)} if hasattr(
                pipe, "text_encoder_2") else {}
            return pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.0, height=size,
                        width=size, num_images_per_prompt=b, latents=comfy_noise(0, latent_shape).to(device),
                        output_type="pt", **kwargs).images

    steps = case["steps"]
    timings: dict[str, list[float]] = {"ours": [], "diffusers": []}
    fns = {"ours": ours, "diffusers": theirs}
    for fn in fns.values():
        fn(2)  # warm-up
    if repeats is None:
        # As many alternating pairs as fit in about 20 s (3 to 15): on a shared CPU a tiny model's run takes under a
        # second and the load of other processes moves single runs by several per cent, so a median of three pairs
        # put the same code anywhere from 0.98 to 1.03 against diffusers.
        t = time.perf_counter()
        ours(steps)
        repeats = max(3, min(15, int(10.0 / max(time.perf_counter() - t, 1e-3))))
    mem = Memory(device)
    mem.start()
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            _sync(device)
            t = time.perf_counter()
            fns[name](steps)
            _sync(device)
            timings[name].append(time.perf_counter() - t)
    memory = mem.result()
    med = {k: statistics.median(v) for k, v in timings.items()}
    flops = count_flops(lambda: ours(2)) - count_flops(lambda: ours(1))
    pairs = sorted(a / b for a, b in zip(timings["ours"], timings["diffusers"]))
    return {"ours_s": med["ours"], "diffusers_s": med["diffusers"], "ratio": med["ours"] / med["diffusers"],
            "repeats": repeats, "pair_ratio_range": [pairs[0], pairs[-1]],
            "steps_per_s": steps / med["ours"], "diffusers_steps_per_s": steps / med["diffusers"],
            "flops_per_step": flops, **memory}


def child(case: dict) -> dict:
    import torch

    _quiet_libraries()
    device = torch.device(case["device"])
    # the matmul rate again, in this process just before the case: on a shared CPU the rate a case can reach moves
    # with the other load, so its MFU is taken against this one (the run's start-up rate is reported too)
    rate = matmul_rate(device, seconds=1.5 if device.type == "cpu" else 2.0)["flops_per_s"]
    with tempfile.TemporaryDirectory(prefix="ft-suite-") as tmp:
        handle = _handle(case["model"], case["precision"], case["device"], Path(tmp))
        from comfy_finetune.core.realsize import parameter_counts

        params = parameter_counts(handle)
        if case["kind"] == "sample":
            out = run_sample_case(case, handle, device)
        else:
            out = run_train_case(case, handle, device)
    return {**out, "params": params, "case_matmul_flops_per_s": rate}


# ---------------------------------------------------------------------------------------------- parent
def run_case(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent.parent),
                                                                         os.environ.get("PYTHONPATH", "")]))}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "wall_s": wall}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-400:] or f"exit {proc.returncode}"}


def overhead_ratios(tmp: Path) -> dict:
    """The graph/patch overhead benchmarks on the tiny SD 1.x model (CPU), as ratios ours / reference."""
    out = {}
    runs = {"sample_vs_diffusers": [str(HERE / "sample_overhead.py"), "--family", "sd1", "--skip-load",
                                    "--threads", "1", "--json", str(tmp / "s.json")],
            "trainlora_vs_bare_loop": [str(HERE / "train_overhead.py"), "--family", "sd1", "--steps", "10", "40",
                                       "--repeats", "3", "--json", str(tmp / "t.json")]}
    for name, args in runs.items():
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        path = Path(args[-1])
        if proc.returncode or not path.exists():
            out[name] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
            continue
        data = json.loads(path.read_text())
        ratio = data["results"][0]["ratio"] if "results" in data else data["ratio"]
        out[name] = {"ratio": ratio, "target": 1.05}
    return out


def label(case: dict) -> str:
    bits = [case["kind"], case["model"], f"{case['size']}px", f"b{case['batch']}", case["precision"]]
    if case.get("gc"):
        bits.append("ckpt")
    if case.get("offload"):
        bits.append("offload")
    if case.get("compile"):
        bits.append("compile")
    for key in ("fp8", "stream", "fused"):
        if case.get(key):
            bits.append(key)
    if case.get("optimizer", "adamw") != "adamw":
        bits.append(case["optimizer"])
    return " ".join(bits)


def report(env: dict, rate: dict, rows: list[dict], overhead: dict, flops_real: dict) -> str:
    cuda = env["device"].startswith("cuda")
    mem_head = "peak MiB" if cuda else "+RSS MiB"
    lines = [f"machine: {env.get('gpu', 'no GPU')} | CPU {env['cpu']} ({env['cores']} cores, {env['threads']} "
             f"threads) | torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
             f"peft {env['peft']}",
             f"matmul rate: {rate['flops_per_s'] / 1e12:.3f} TFLOP/s ({rate['dtype']}, {rate['n']}^3)", "",
             f"{'case':44}{'s/step':>9}{'img/s':>9}{'steps/s':>9}{'vs diff.':>9}{'GFLOP':>10}{'MFU':>7}"
             f"{mem_head:>10}"]
    for row in rows:
        r = row["result"]
        if "error" in r:
            lines.append(f"{label(row['case']):44}  error: {r['error']}")
            continue
        mem = r.get("peak_mib", r.get("growth_mib", float("nan")))
        if row["case"]["kind"] == "sample":
            lines.append(f"{label(row['case']):44}{r['ours_s'] / row['case']['steps']:9.4f}{'':9}"
                         f"{r['steps_per_s']:9.2f}{r['ratio']:9.3f}{r['flops_per_step'] / 1e9:10.1f}"
                         f"{r['mfu']:7.1%}{mem:10.0f}"
                         + (f"  (median of {r['repeats']} pairs, {r['pair_ratio_range'][0]:.3f}-"
                            f"{r['pair_ratio_range'][1]:.3f})" if "repeats" in r else ""))
        else:
            lines.append(f"{label(row['case']):44}{r['step_s']:9.4f}{r['images_per_s']:9.2f}{'':9}{'':9}"
                         f"{r['flops_per_step'] / 1e9:10.1f}{r['mfu']:7.1%}{mem:10.0f}")
    for name, f in flops_real.items():
        lines.append(f"real-size {name}: LoRA step {f['lora_step_flops'] / 1e12:.2f} TFLOP, UNet forward "
                     f"{f['unet_forward_flops'] / 1e12:.2f} TFLOP (meta device count)")
    for name, o in overhead.items():
        lines.append(f"overhead {name}: " + (f"{o['ratio']:.3f} (target <= {o['target']})" if "ratio" in o
                                             else f"error {o['error']}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="batch 1 only")
    parser.add_argument("--only", default="", help="comma-separated kinds to run (lora,dreambooth,ti,sample)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the graph/patch overhead ratios")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(child(json.loads(args.case))), flush=True)
        return 0

    import torch

    _quiet_libraries()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    models = [m for m in (args.models or ("sd15,sdxl" if device.type == "cuda" else "tiny,small")).split(",") if m]
    env = environment(device)
    rate = matmul_rate(device)
    print(f"matmul rate {rate['flops_per_s'] / 1e12:.3f} TFLOP/s ({rate['dtype']})", flush=True)
    cases = plan(models, args.device, args.quick)
    if args.only:
        cases = [c for c in cases if c["kind"] in args.only.split(",")]
    rows = []
    for case in cases:
        case["device"] = args.device
        result = run_case(case, args.timeout)
        if "flops_per_step" in result:
            step = result["step_s"] if "step_s" in result else result["ours_s"] / case["steps"]
            peak = max(result.get("case_matmul_flops_per_s", 0.0), rate["flops_per_s"]) if device.type == "cuda" \
                else result.get("case_matmul_flops_per_s") or rate["flops_per_s"]
            result["mfu"] = result["flops_per_step"] / step / peak
        rows.append({"case": case, "label": label(case), "result": result})
        print(f"  {label(case)}: " + (result.get("error") or ", ".join(
            f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))), flush=True)
    flops_real = real_size_flops()
    overhead = {}
    if "tiny" in models and device.type == "cpu" and not args.no_overhead:
        with tempfile.TemporaryDirectory(prefix="ft-suite-") as tmp:
            overhead = overhead_ratios(Path(tmp))
    text = report(env, rate, rows, overhead, flops_real)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "matmul": rate, "results": rows,
                                               "overhead": overhead, "real_size_flops": flops_real,
                                               "table": text}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
