"""Overhead of our generation path against plain diffusers, on one tiny model.

Measures, in one run and on the same tiny randomly initialised model (``core.tiny``):

1. ``Sample`` node vs. a plain diffusers pipeline call with the same prompt, negative
   prompt, steps, cfg, size, scheduler (euler + normal = ``EulerDiscreteScheduler`` with
   ``timestep_spacing="linspace"``) and the same initial noise. Reports the median time of
   each, the ratio ours/diffusers (target <= 1.05) and the max abs difference between the
   two images (should be ~1e-4 or less).
2. Loading a single-file (A1111/ComfyUI) checkpoint: ``core.loading.load_single_file`` vs.
   diffusers' ``from_single_file(..., config=<tiny diffusers folder>)``.
3. Loading the diffusers folder: ``core.loading.load_diffusers_folder`` vs. ``from_pretrained``.

Runs are interleaved (the order alternates every repeat) after one warm-up of each side.
``--sections`` adds a per-section breakdown (prompt encoding, UNet, scheduler, VAE decode) of both
sides of the ``Sample`` comparison.

    python benchmarks/sample_overhead.py --family sdxl --steps 20 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Quiet and offline before diffusers/transformers are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_RATIO = 1.05
PROMPT = "a photo of a red circle, high quality, detailed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl", "kolors"), default="sd1",
                   help="tiny model family (kolors: against KolorsPipeline; no single-file checkpoint)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--size", type=int, default=64, help="image width and height in pixels (multiple of 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both pipelines run (loading is always timed on the CPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--cfg", type=float, default=7.0, help="guidance scale")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--prompt", default=PROMPT, help="prompt (negative is empty)")
    p.add_argument("--sections", action="store_true",
                   help="also time sections of both sides (prompt encoding, UNet, scheduler, VAE decode)")
    p.add_argument("--skip-load", action="store_true", help="only the Sample benchmark")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.size < 8 or args.size % 8:
        p.error("--size must be a positive multiple of 8")
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--steps, --repeats and --threads must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------ helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def interleaved(ours, theirs, repeats: int, device) -> tuple[list[float], list[float], object, object]:
    """One warm-up each, then ``repeats`` timed runs of each, alternating which side goes first."""
    _, out_ours = _timed(ours, device)
    _, out_theirs = _timed(theirs, device)
    t_ours, t_theirs = [], []
    for r in range(repeats):
        pair = ((ours, t_ours), (theirs, t_theirs))
        for fn, sink in (pair if r % 2 == 0 else pair[::-1]):
            dt, _ = _timed(fn, device)
            sink.append(dt)
    return t_ours, t_theirs, out_ours, out_theirs


def row(name: str, t_ours: list[float], t_theirs: list[float], **extra) -> dict:
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    return {"name": name, "ours_s": mo, "diffusers_s": mt, "ratio": mo / mt if mt > 0 else float("inf"),
            "ours_all_s": t_ours, "diffusers_all_s": t_theirs, **extra}


@contextlib.contextmanager
def quiet():
    """Silence Python warnings (deprecations, config notes) from the libraries during loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ setup
def setup_models(root: Path, family: str) -> tuple[Path, Path | None]:
    """Temp models dir with the tiny diffusers folder and a single-file copy of it (None for Kolors)."""
    import torch
    from safetensors.torch import save_file

    from comfy_finetune import host
    from comfy_finetune.core.ldm import diffusers_to_ldm
    from comfy_finetune.core.loading import load_diffusers_folder
    from comfy_finetune.core.tiny import build_tiny_kolors_folder, build_tiny_pipeline_folder

    models = root / "models"
    for sub in ("checkpoints", "loras", "embeddings", "diffusers"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    (root / "output").mkdir(exist_ok=True)
    os.environ["COMFY_FINETUNE_CACHE"] = str(root / "cache")
    host.configure(models_dir=models, output_dir=root / "output", progress=False)
    if family == "kolors":  # Kolors ships as a diffusers folder only
        return build_tiny_kolors_folder(models / "diffusers" / "tiny-kolors", seed=0), None
    folder = build_tiny_pipeline_folder(models / "diffusers" / f"tiny-{family}", family, seed=0)
    base = load_diffusers_folder(folder, torch.float32, torch.device("cpu"))
    sd = diffusers_to_ldm(base.family, base.unet.state_dict(), base.vae.state_dict(),
                          [te.state_dict() for te in base.text_encoders], unet_config=dict(base.unet.config),
                          vae_config=dict(base.vae.config))
    ckpt = models / "checkpoints" / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    return folder, ckpt


def pipeline_class(family: str):
    from diffusers import KolorsPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sdxl": StableDiffusionXLPipeline, "kolors": KolorsPipeline}.get(family, StableDiffusionPipeline)


def _pipeline_kwargs(family: str) -> dict:
    # The XL and Kolors pipelines have no safety checker argument; passing it only triggers a warning.
    return {} if family in ("sdxl", "kolors") else {"safety_checker": None}


# ------------------------------------------------------------------------------------------------ 1. Sample
def bench_sample(args, folder: Path, device) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler

    from comfy_finetune.core.sampling import comfy_noise
    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS
    from comfy_finetune.nodes.generation import LoadBase, Negative

    with quiet():
        handle = LoadBase().run(ckpt_name=f"diffusers/{folder.name}", dtype="fp32", device=device.type)[0]
        pipe = pipeline_class(args.family).from_pretrained(str(folder), torch_dtype=torch.float32,
                                                           local_files_only=True, **_pipeline_kwargs(args.family))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    aligned = align_padding(pipe, handle)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sample_node = NODE_CLASS_MAPPINGS["Sample"]()
    size, negative = args.size, Negative("")

    def ours():
        return sample_node.run(pipe=handle, prompt=args.prompt, seed=args.seed, steps=args.steps, cfg=args.cfg,
                               sampler_name="euler", scheduler="normal", width=size, height=size, batch_size=1,
                               negative=negative)[0]

    def theirs():
        latents = comfy_noise(args.seed, (1, 4, size // 8, size // 8)).to(device)
        return pipe(prompt=args.prompt, negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.cfg,
                    height=size, width=size, latents=latents, output_type="pt").images

    t_ours, t_theirs, img_ours, img_theirs = interleaved(ours, theirs, args.repeats, device)
    img_theirs = img_theirs.float().permute(0, 2, 3, 1).cpu()
    diff = float((img_ours.float().cpu() - img_theirs).abs().max())
    # The image spread shows the comparison is not between two blank images.
    result = row("Sample vs pipeline()", t_ours, t_theirs, max_abs_diff=diff, image_std=float(img_ours.float().std()),
                 diffusers_pad_aligned=aligned)
    if args.sections:
        result["sections"] = sample_sections(ours, theirs, handle, pipe, args.repeats, device)
    return result


def align_padding(pipe, handle) -> list[str]:
    """Make diffusers pad each prompt the way our encoder does (the family's rule, as in ComfyUI).

    Padding changes the conditioning (the UNet attends to every one of the 77 positions), so the
    two images only match when both pad alike. Real checkpoints ship tokenizers that already agree
    (SD 1.x and SDXL's CLIP-L pad with the end token, SD 2.x and SDXL's bigG with "!" = id 0); a
    folder whose tokenizer pads otherwise is aligned to our rule (``families.FamilyInfo.te_pad_ids``)
    so the comparison stays like for like. Returns the tokenizers changed, for the report.
    """
    changed = []
    if handle.base.family.value == "kolors":  # one ChatGLM tokenizer: both sides pad with its own pad id
        return changed
    names = ["tokenizer", "tokenizer_2"]
    for name, kind in zip(names, handle.base.info.te_pad_ids):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        want = tok.eos_token_id if kind == "eos" else 0
        if tok.pad_token_id != want:
            tok.pad_token = tok.convert_ids_to_tokens(want)
            changed.append(f"{name}: pad id -> {want}")
    return changed


@contextlib.contextmanager
def _wrapped(targets, device, totals: dict[str, float]):
    """Temporarily wrap ``getattr(obj, attr)`` for each ``(obj, attr, name)`` to add its time to ``totals[name]``."""
    originals = []

    def wrap(name, fn):
        def inner(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(device)
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return inner

    try:
        for obj, attr, name in targets:
            originals.append((obj, attr, getattr(obj, attr), attr in vars(obj)))
            setattr(obj, attr, wrap(name, originals[-1][2]))
        yield totals
    finally:
        for obj, attr, orig, own in reversed(originals):
            if own:
                setattr(obj, attr, orig)
            else:
                delattr(obj, attr)  # e.g. unet.forward: we shadowed the class method with an instance attribute


def _sections(fn, targets, repeats: int, device) -> dict[str, float]:
    totals: dict[str, float] = {}
    per_run: list[dict[str, float]] = []
    wall: list[float] = []
    with _wrapped(targets, device, totals):
        for _ in range(repeats):
            totals.clear()
            dt, _ = _timed(fn, device)
            wall.append(dt)
            per_run.append(dict(totals))
    names = sorted({k for d in per_run for k in d})
    out = {k: statistics.median(d.get(k, 0.0) for d in per_run) for k in names}
    out["total (wall)"] = statistics.median(wall)
    out["other (not wrapped)"] = out["total (wall)"] - sum(v for k, v in out.items() if k != "total (wall)")
    return out


def sample_sections(ours, theirs, handle, pipe, repeats: int, device) -> dict:
    """Median seconds per section of each side, by wrapping the pieces they call (no source edits)."""
    import diffusers

    from comfy_finetune.core import conditioning, sampling

    sched = diffusers.EulerDiscreteScheduler
    common = [(sched, "set_timesteps", "set_timesteps"), (sched, "scale_model_input", "scale_model_input"),
              (sched, "step", "scheduler.step")]
    ours_targets = [(sampling, "make_scheduler", "make scheduler"), (conditioning.PromptEncoder, "encode",
                    "prompt encoding"), (handle.base.unet, "forward", "UNet forward"),
                    (sampling, "decode", "VAE decode (+to image)"), *common]
    theirs_targets = [(pipe, "encode_prompt", "prompt encoding"), (pipe.unet, "forward", "UNet forward"),
                      (pipe.vae, "decode", "VAE decode (+to image)"),
                      (pipe.image_processor, "postprocess", "VAE decode (+to image)"), *common]
    return {"ours": _sections(ours, ours_targets, repeats, device),
            "diffusers": _sections(theirs, theirs_targets, repeats, device)}


# ------------------------------------------------------------------------------------------------ 2. loading
def bench_single_file(args, folder: Path, ckpt: Path) -> dict:
    import torch

    from comfy_finetune.core.loading import load_single_file

    cls = pipeline_class(args.family)
    dev = torch.device("cpu")

    def ours():
        return load_single_file(ckpt, torch.float32, dev)

    def theirs():
        return cls.from_single_file(str(ckpt), config=str(folder), local_files_only=True, torch_dtype=torch.float32,
                                    **_pipeline_kwargs(args.family))

    with quiet():
        t_ours, t_theirs, base, pipe = interleaved(ours, theirs, args.repeats, dev)
    ref = pipe.unet.state_dict()
    weight_diff = max(float((t.float() - ref[k].float()).abs().max()) for k, t in base.unet.state_dict().items())
    return row("load single file", t_ours, t_theirs, unet_max_abs_weight_diff=weight_diff)


def bench_folder(args, folder: Path) -> dict:
    import torch

    from comfy_finetune.core.loading import load_diffusers_folder

    cls = pipeline_class(args.family)
    dev = torch.device("cpu")

    def ours():
        return load_diffusers_folder(folder, torch.float32, dev)

    def theirs():
        return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32,
                                   **_pipeline_kwargs(args.family))

    with quiet():
        t_ours, t_theirs, _, _ = interleaved(ours, theirs, args.repeats, dev)
    return row("load diffusers folder", t_ours, t_theirs)


# ------------------------------------------------------------------------------------------------ report
def environment(args, device) -> dict:
    import diffusers
    import torch
    import transformers

    env = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "device": str(device),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    busy = busy_cores()
    if busy is not None:
        env["busy_cores_at_start"] = round(busy, 2)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def busy_cores(interval: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now (Linux /proc/stat), or None elsewhere."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    return (os.cpu_count() or 1) * (total - (i1 - i0)) / total if total > 0 else 0.0


def print_report(env: dict, settings: dict, rows: list[dict], sections: dict | None) -> None:
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("settings:    " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print()
    w = max(len(r["name"]) for r in rows) + 2
    print(f"{'name':<{w}}{'ours (s)':>11}{'diffusers (s)':>15}{'ratio':>8}  notes")
    print("-" * (w + 34 + 30))
    for r in rows:
        notes = []
        if "max_abs_diff" in r:
            notes.append(f"max |img diff| {r['max_abs_diff']:.2e} (img std {r['image_std']:.3f})")
            notes.append("OK" if r["ratio"] <= TARGET_RATIO else f"ABOVE target {TARGET_RATIO}")
            if r.get("diffusers_pad_aligned"):
                notes.append("diffusers " + ", ".join(r["diffusers_pad_aligned"]))
        if "unet_max_abs_weight_diff" in r:
            notes.append(f"max |unet weight diff| {r['unet_max_abs_weight_diff']:.1e}")
        print(f"{r['name']:<{w}}{r['ours_s']:>11.4f}{r['diffusers_s']:>15.4f}{r['ratio']:>8.3f}  {'; '.join(notes)}")
    if sections:
        print()
        print("Sample sections, median seconds (--sections):")
        names = sorted(set(sections["ours"]) | set(sections["diffusers"]),
                       key=lambda k: (k.startswith(("total", "other")), -sections["ours"].get(k, 0.0)))
        print(f"  {'section':<24}{'ours':>9}{'diffusers':>11}{'ours-diff':>11}")
        for k in names:
            o, d = sections["ours"].get(k, 0.0), sections["diffusers"].get(k, 0.0)
            print(f"  {k:<24}{o:>9.4f}{d:>11.4f}{o - d:>+11.4f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging knobs are best effort
        pass

    env = environment(args, device)
    busy = env.get("busy_cores_at_start", 0.0)
    if device.type == "cpu" and busy > 0.3:
        print(f"warning: other processes keep {busy:.1f} of {os.cpu_count()} cores busy; multi-threaded CPU "
              f"timings get noisy and slow under contention (run on an idle machine, or try --threads 1)",
              file=sys.stderr, flush=True)
    settings = {"family": args.family, "steps": args.steps, "size": args.size, "cfg": args.cfg,
                "repeats": args.repeats, "seed": args.seed, "prompt": args.prompt}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        with quiet():
            folder, ckpt = setup_models(Path(tmp), args.family)
        sample_row = bench_sample(args, folder, device)
        rows.append(sample_row)
        if not args.skip_load:
            if ckpt is not None:
                rows.append(bench_single_file(args, folder, ckpt))
            rows.append(bench_folder(args, folder))
    print_report(env, settings, rows, sample_row.get("sections"))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "settings": settings, "results": rows,
                                               "target_ratio": TARGET_RATIO}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
