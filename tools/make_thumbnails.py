"""Make the template thumbnails: run every example workflow headless and save ``<stem>.jpg`` next to it.

ComfyUI's template browser (frontend 1.27) shows a custom node pack's template ``<stem>.json`` with the title
``<stem>`` and the thumbnail ``/api/workflow_templates/<pack folder>/<stem>.jpg``, which the server serves from
``example_workflows/<stem>.jpg``. This script makes those JPEGs from the images each workflow's SaveImage nodes
write (PreviewImage outputs are ignored), tiled into a square of ``--size`` pixels and kept under ``--max-bytes``.

Re-runnable: run it again whenever the examples (or their model) change. Each existing thumbnail is replaced in
one rename, and the script says so. Examples::

    python tools/make_thumbnails.py                        # every example, as saved
    python tools/make_thumbnails.py --max-train-steps 20   # quicker: cap the training nodes' steps
    python tools/make_thumbnails.py --only "Train a LoRA" --set "Train a LoRA:Sample.seed=3"
    python tools/make_thumbnails.py --check                # only check the thumbnails present (exit 1 if not)

Each workflow runs as ``python -m comfy_finetune run WORKFLOW.json`` in a temporary folder (its own models and
output folders, deleted afterwards), with the python running this script.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "example_workflows"
TRAINING_NODES = ("FinetuneTrainLoRA", "LearnEmbedding", "DreamBoothTrain", "FinetunePivotalTuning")
DEFAULT_SIZE = 256
DEFAULT_MAX_BYTES = 40_000
BACKGROUND = (24, 24, 27)


# ---------------------------------------------------------------------------------------------- images
def compose_thumbnail(images, size: int = DEFAULT_SIZE, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Tile ``images`` (PIL images, at most 16 used) into a ``size`` x ``size`` JPEG of at most ``max_bytes``.

    The grid is ``ceil(sqrt(n))`` columns wide and centred on a dark background; each image keeps its aspect ratio
    inside its cell. The JPEG quality is lowered step by step until the file fits; ``ValueError`` if even the
    lowest quality does not fit.
    """
    from PIL import Image  # noqa: PLC0415

    images = list(images)[:16]
    if not images:
        raise ValueError("no images to make a thumbnail from")
    if size < 16:
        raise ValueError(f"thumbnail size {size} is too small (at least 16 px)")
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell = size // cols
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    top = (size - rows * cell) // 2
    left0 = (size - cols * cell) // 2
    for i, img in enumerate(images):
        img = img.convert("RGB")
        scale = min(cell / img.width, cell / img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        r, c = divmod(i, cols)
        canvas.paste(img, (left0 + c * cell + (cell - w) // 2, top + r * cell + (cell - h) // 2))
    for quality in (88, 80, 72, 64, 56, 48, 40, 32, 25):
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
        data = buf.getvalue()
        if len(data) <= max_bytes:
            return data
    raise ValueError(f"a {size} px thumbnail does not fit in {max_bytes} bytes even at JPEG quality 25")


def check_thumbnail(path: Path, size: int = DEFAULT_SIZE, max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """``None`` if ``path`` is a ``size`` x ``size`` JPEG of at most ``max_bytes``, else what is wrong."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not path.is_file():
        return f"{path.name} is missing"
    n = path.stat().st_size
    if n > max_bytes:
        return f"{path.name} is {n} bytes (at most {max_bytes})"
    try:
        with Image.open(path) as img:
            fmt, dims = img.format, img.size
    except (UnidentifiedImageError, OSError) as exc:
        return f"{path.name} is not an image ({exc})"
    if fmt != "JPEG":
        return f"{path.name} is {fmt}, not JPEG"
    if dims != (size, size):
        return f"{path.name} is {dims[0]}x{dims[1]}, not {size}x{size}"
    return None


def write_replacing(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` in one rename (the pack's atomic writer: temp file in the same folder, mode
    ``0o666 & ~umask`` so the server and other users can read it); True if it replaced a file."""
    from comfy_finetune.core.atomic import atomic_write  # noqa: PLC0415 - pack imports stay local (--check needs none)

    existed = path.exists()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return existed


# ---------------------------------------------------------------------------------------------- running
def training_step_caps(workflow: Path, max_steps: int) -> list[str]:
    """``--set`` overrides capping every training node's ``steps`` at ``max_steps`` (by node id)."""
    from comfy_finetune.headless.runner import load_prompt  # noqa: PLC0415

    api, _ = load_prompt(workflow)  # old node ids come back as the current ones
    caps = []
    for nid, node in api.items():
        steps = node.get("inputs", {}).get("steps")
        if node.get("class_type") in TRAINING_NODES and isinstance(steps, int) and steps > max_steps:
            caps.append(f"{nid}.steps={max_steps}")
    return caps


def run_example(workflow: Path, overrides: list[str], workdir: Path, timeout: float) -> list[Path]:
    """Run ``workflow`` headless in ``workdir``; the PNGs its SaveImage nodes wrote, in name order."""
    out = workdir / "output"
    cmd = [sys.executable, "-m", "comfy_finetune", "run", str(workflow), "--quiet",
           "--models", str(workdir / "models"), "--output", str(out), "--input", str(workdir / "input")]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    env.setdefault("COMFY_FINETUNE_CACHE", str(workdir / "cache"))
    proc = subprocess.run(cmd, cwd=str(workdir), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-30:])
        raise RuntimeError(f"{workflow.name} failed (exit {proc.returncode}):\n{tail}")
    # SaveImage writes under the output folder; PreviewImage under its hidden temp folder (skipped)
    return sorted(p for p in out.rglob("*.png") if not any(part.startswith(".") for part in p.relative_to(out).parts))


def make_one(workflow: Path, overrides: list[str], args) -> dict:
    from PIL import Image  # noqa: PLC0415

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="thumb-") as tmp:
        work = Path(tmp)
        (work / "input").mkdir()
        pngs = run_example(workflow, overrides, work, args.timeout)
        if not pngs:
            raise RuntimeError(f"{workflow.name} saved no image through a SaveImage node: nothing to show")
        opened = [Image.open(p) for p in pngs]
        try:
            data = compose_thumbnail(opened, args.size, args.max_bytes)
        finally:
            for img in opened:
                img.close()
    target = workflow.with_suffix(".jpg")
    replaced = write_replacing(target, data)
    return {"name": workflow.stem, "images": len(pngs), "bytes": len(data), "seconds": time.monotonic() - t0,
            "replaced": replaced, "overrides": overrides}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=Path, default=EXAMPLES_DIR, help="folder of workflow .json files")
    p.add_argument("--only", action="append", default=[], metavar="STEM",
                   help="only this workflow (file name without .json; repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEM:NODE.INPUT=VALUE",
                   help="an override for one workflow, as the runner's --set (repeatable)")
    p.add_argument("--max-train-steps", type=int, default=None,
                   help="cap the steps of every training node (quicker thumbnails)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="thumbnail width and height in pixels")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest thumbnail file size")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one workflow may run")
    p.add_argument("--check", action="store_true", help="run nothing; check every workflow has a good thumbnail")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workflows = sorted(args.examples.glob("*.json"))
    if args.only:
        unknown = sorted(set(args.only) - {w.stem for w in workflows})
        if unknown:
            print(f"error: no workflow named {unknown} in {args.examples}; have {[w.stem for w in workflows]}",
                  file=sys.stderr)
            return 2
        workflows = [w for w in workflows if w.stem in args.only]
    per_workflow: dict[str, list[str]] = {}
    for item in args.overrides:
        stem, sep, override = item.partition(":")
        if not sep or stem not in {w.stem for w in sorted(args.examples.glob("*.json"))}:
            print(f"error: --set {item!r} must be 'STEM:NODE.INPUT=VALUE' with STEM a workflow's file name "
                  f"without .json", file=sys.stderr)
            return 2
        per_workflow.setdefault(stem, []).append(override)

    if args.check:
        problems = [msg for w in workflows if (msg := check_thumbnail(w.with_suffix(".jpg"), args.size,
                                                                       args.max_bytes))]
        stray = sorted(j.name for j in args.examples.glob("*.jpg") if not j.with_suffix(".json").exists())
        problems += [f"{name} belongs to no workflow" for name in stray]
        for msg in problems:
            print(f"problem: {msg}", file=sys.stderr)
        print(f"{len(workflows)} workflows, {len(problems)} problems")
        return 1 if problems else 0

    failed = 0
    for w in workflows:
        overrides = list(per_workflow.get(w.stem, []))
        if args.max_train_steps is not None:
            overrides = training_step_caps(w, args.max_train_steps) + overrides
        try:
            r = make_one(w, overrides, args)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            failed += 1
            print(f"FAILED {w.stem}: {exc}", file=sys.stderr)
            continue
        action = "replaced" if r["replaced"] else "wrote"
        print(f"{action} {w.with_suffix('.jpg').name}: {r['images']} images, {r['bytes']} bytes, "
              f"{r['seconds']:.1f} s" + (f", overrides {r['overrides']}" if r["overrides"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
