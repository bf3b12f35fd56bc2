"""Remake the README's pictures (docs/images/) in a real ComfyUI with its real frontend.

    COMFYUI_DIR=/path/to/ComfyUI python tests/browser/readme_images.py

Starts ComfyUI with this pack (tests/comfyui_harness.py), then drives headless Chromium with tests/browser/drive.mjs
(same requirements as tests/test_browser.py: node, $CHROMIUM, $PLAYWRIGHT_CORE_DIR): trains the "Train a LoRA"
example for a minute, takes the training view mid-run, and builds the bridge graphs of bridge_graphs.json.
The PNGs are scaled down and reduced to 256 colours so each stays well under 150 KB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import comfyui_harness as harness  # noqa: E402

REPO_ROOT = harness.REPO_ROOT
OUT = REPO_ROOT / "docs" / "images"
MAX_WIDTH = 1100
MAX_BYTES = 150 * 1024


def drive(url: str, out_dir: Path, job: dict) -> dict:
    job = {"url": url, "out_dir": str(out_dir), **job}
    (out_dir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "CHROMIUM": os.environ.get("CHROMIUM", "/usr/bin/chromium"),
           "PLAYWRIGHT_CORE_DIR": os.environ.get("PLAYWRIGHT_CORE_DIR",
                                                 "/work/browser-tools/node_modules/playwright-core")}
    subprocess.run([shutil.which("node") or "node", str(HERE / "drive.mjs"), str(out_dir / "job.json")], env=env,
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    result = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    if result.get("error"):
        raise SystemExit(f"driver error: {result['error']}")
    return result


def shrink(src: Path, dst: Path, max_width: int = MAX_WIDTH) -> None:
    from PIL import Image  # noqa: PLC0415

    image = Image.open(src).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    size = dst.stat().st_size
    print(f"{dst.relative_to(REPO_ROOT)}: {image.width}x{image.height}, {size / 1024:.0f} KB")
    if size > MAX_BYTES:
        raise SystemExit(f"{dst} is {size / 1024:.0f} KB, over {MAX_BYTES // 1024} KB")


def main() -> None:
    comfyui = harness.comfyui_dir_from_env()
    if comfyui is None:
        raise SystemExit("set COMFYUI_DIR to a ComfyUI checkout")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with harness.ComfyServer(comfyui, tmp / "server") as server:
            server.post_json("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
            workflow = next(w for w in (json.loads(p.read_text(encoding="utf-8"))
                                        for p in sorted((REPO_ROOT / "example_workflows").glob("*.json")))
                            if any(n.get("type") == "FinetuneTrainLoRA" for n in w.get("nodes", [])))
            shots = tmp / "training"
            shots.mkdir()
            drive(server.url, shots, {"task": "training", "workflow": workflow, "node_type": "FinetuneTrainLoRA",
                                      "widgets": {"steps": 120, "validate_every": 30}, "live_at_step": 80,
                                      "timeout_s": 400})
            shrink(shots / "training-live.png", OUT / "training-view.png")
            graphs = tmp / "graphs"
            graphs.mkdir()
            spec = json.loads((HERE / "bridge_graphs.json").read_text(encoding="utf-8"))["graphs"]
            drive(server.url, graphs, {"task": "graphs", "graphs": spec, "width": 1600, "height": 1000})
            for g in spec:
                shrink(graphs / f"{g['name']}.png", OUT / f"{g['name']}.png")


if __name__ == "__main__":
    main()
