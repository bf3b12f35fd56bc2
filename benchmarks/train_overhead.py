"""FinetuneTrainLoRA against a minimal bare PyTorch LoRA loop, side by side in one run.

Both train the same UNet with the same peft LoRA config (rank, alpha, targets), optimizer (AdamW),
batch, precision and data; the bare loop gets latents and text embeddings precomputed, i.e. it is
the least a LoRA step can cost. Per-step time is the slope between a short and a long run (so
one-off setup such as latent encoding is excluded from both); peak memory is measured in a fresh
subprocess per variant, as growth over the loaded model (GPU: ``torch.cuda.max_memory_allocated``;
CPU: peak RSS).

    python benchmarks/train_overhead.py [--family sd1] [--steps 10 30] [--batch 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = "attention+feedforward"


def _setup(tmp: Path, family: str, device: str):
    from comfy_finetune import host
    from comfy_finetune.core.loading import load_base
    from comfy_finetune.core.tiny import build_tiny_pipeline_folder
    from comfy_finetune.nodes.data import find_dataset_folder
    from comfy_finetune.training.data import prepare, read_folder

    host.configure(models_dir=tmp / "models", output_dir=tmp / "out", progress=False)
    folder = tmp / "models" / "diffusers" / f"tiny-{family}"
    if not folder.exists():
        build_tiny_pipeline_folder(folder, family, seed=0)
    handle = load_base(f"diffusers/tiny-{family}", "fp32", device)
    data = prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)
    return handle, data


def ours(handle, data, steps: int, batch: int, precision: str) -> float:
    from comfy_finetune.training.lora_trainer import LoraSpec, train_lora
    from comfy_finetune.training.settings import TrainSettings

    t = time.perf_counter()
    train_lora(handle, data, TrainSettings(steps=steps, learning_rate=1e-4, batch_size=batch, precision=precision),
               LoraSpec(rank=8, alpha=8, targets=TARGETS))
    _sync(handle.base.device)
    return time.perf_counter() - t


def bare(handle, data, steps: int, batch: int, precision: str) -> float:
    """The minimal loop: peft LoRA on a private copy of the UNet, precomputed latents and embeddings."""
    import copy

    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    from comfy_finetune.core.conditioning import encode_prompt, sdxl_added
    from comfy_finetune.training.lora_trainer import UNET_TARGETS

    base = handle.base
    t = time.perf_counter()
    unet = copy.deepcopy(base.unet)
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=list(UNET_TARGETS[TARGETS])), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(base.scheduler_config)
    with torch.no_grad():
        px = torch.stack([ex.pixels for ex in data.examples]).to(base.device)
        lat = base.vae.encode(px).latent_dist.mean * base.vae.config.scaling_factor
        encoded = [encode_prompt(handle, ex.caption) for ex in data.examples]
        ctx = torch.cat([e.cond for e in encoded]).to(base.device)
        pooled = torch.cat([e.pooled for e in encoded]) if encoded[0].pooled is not None else None
    gen = torch.Generator("cpu").manual_seed(0)
    autocast = (torch.autocast(base.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else None)
    for _ in range(steps):
        idx = torch.randint(0, lat.shape[0], (batch,), generator=gen)
        x0, c = lat[idx], ctx[idx]
        added = sdxl_added(pooled[idx], 64, 64, base.dtype, base.device) if pooled is not None else None
        noise = torch.randn(x0.shape, generator=gen).to(base.device)
        ts = torch.randint(0, 1000, (batch,), generator=gen).to(base.device)
        noisy = sched.add_noise(x0, noise, ts)
        opt.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast:
                pred = unet(noisy, ts, encoder_hidden_states=c, added_cond_kwargs=added).sample
        else:
            pred = unet(noisy, ts, encoder_hidden_states=c, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
    _sync(base.device)
    return time.perf_counter() - t


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss(field: str) -> int:
    """Bytes of ``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _peak(variant: str, args) -> float:
    """Peak memory of one variant in a fresh process (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--family", args.family, "--batch",
                          str(args.batch), "--precision", args.precision, "--device", args.device,
                          "--steps", str(args.steps[0]), str(args.steps[0]), "--tmp", args.tmp],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--steps", nargs=2, type=int, default=[20, 100], metavar=("SHORT", "LONG"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--tmp", default="")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    args.tmp = args.tmp or tempfile.mkdtemp(prefix="ft-bench-")
    import diffusers.utils.logging as dlog
    import torch
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    handle, data = _setup(Path(args.tmp), args.family, args.device)
    fns = {"ours": ours, "bare": bare}
    if args.child:
        # Peak memory the training itself adds on top of the loaded model (GPU: allocator peak; CPU: peak RSS
        # growth after setup, so the imports and the model, identical for both variants, are left out).
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss("VmRSS")
            _reset_peak_rss()
        fns[args.child](handle, data, args.steps[0], args.batch, args.precision)
        if args.device.startswith("cuda"):
            print((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            print((_rss("VmHWM") - base) / 2**20)
        return

    short, long = args.steps
    for fn in fns.values():  # warm up both
        fn(handle, data, 2, args.batch, args.precision)
    slopes: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(args.repeats):
        for name, fn in fns.items():  # interleaved, so drift hits both alike
            t_short = fn(handle, data, short, args.batch, args.precision)
            t_long = fn(handle, data, long, args.batch, args.precision)
            slopes[name].append((t_long - t_short) / (long - short))
    step = {k: statistics.median(v) for k, v in slopes.items()}
    peak = {k: _peak(k, args) for k in fns}
    ratio = step["ours"] / step["bare"]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"family {args.family}, batch {args.batch}, precision {args.precision}, steps {short}->{long}")
    print(f"{'':18}{'ours':>12}{'bare loop':>12}{'ratio':>8}")
    print(f"{'s / step':18}{step['ours']:12.4f}{step['bare']:12.4f}{ratio:8.3f}   (target <= 1.05)")
    unit = "MiB GPU" if args.device.startswith("cuda") else "MiB RSS"
    ratio_mem = peak["ours"] / peak["bare"] if peak["bare"] > 0 else float("nan")
    print(f"{'peak +' + unit:18}{peak['ours']:12.1f}{peak['bare']:12.1f}{ratio_mem:8.3f}   (growth over the "
          "loaded model)")
    if args.json:
        Path(args.json).write_text(json.dumps({"step_seconds": step, "ratio": ratio, "peak_mib": peak,
                                               "settings": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
