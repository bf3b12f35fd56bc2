"""Add LoRA against ComfyUI's own loader: for each adapter kind (LoRA, LoCon, LoHa, LoKr, full differences, DoRA on
LoRA / LoHa / LoKr, OFT, BOFT, set_weight, norm differences) the weights our patch gives equal those ComfyUI's
``comfy.lora.load_lora`` + ``calculate_weight`` compute for the same file, strength and base weights, also for two
files chained on one layer. Runs ComfyUI's code in its own python (``COMFYUI_DIR``; skipped without it), once for
every case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

_COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not _COMFYUI_DIR or not (Path(_COMFYUI_DIR) / "comfy" / "lora.py").is_file():
    pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout (needed to run ComfyUI's LoRA loader)",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402
import test_adapters as A  # noqa: E402

from comfy_finetune.core.handle import LoraPatch  # noqa: E402
from comfy_finetune.core.lora_handle import lora_for_handle  # noqa: E402

# ComfyUI's loader on each job's files: every module named lora_unet_<path with _> is mapped to "<path>.weight" (and
# its bias), as ComfyUI's key map does for these names; each key's patches are applied in the job's order at their
# strengths. What ComfyUI logs while a job runs is kept with the job's result.
_SCRIPT = r"""
import json, logging, sys
comfy_dir, jobs_path, weights_path, out_dir = sys.argv[1:5]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()  # as ComfyUI's main.py does, so --cpu applies
from safetensors.torch import load_file, save_file
import comfy.lora

class Keep(logging.Handler):
    lines = []
    def emit(self, record):
        Keep.lines.append(record.getMessage())

logging.getLogger().addHandler(Keep())
weights = load_file(weights_path)
to_load = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in weights if k.endswith(".weight")}
logs = {}
for job in json.load(open(jobs_path)):
    Keep.lines = []
    loaded = [(float(s), comfy.lora.load_lora(load_file(path), to_load)) for path, s in job["patches"]]
    out = {}
    for key in dict.fromkeys(k for _, patches in loaded for k in patches):
        steps = [(s, patches[key], 1.0, None, None) for s, patches in loaded if key in patches]
        out[key] = comfy.lora.calculate_weight(steps, weights[key].clone(), key)
    save_file({k: v.contiguous() for k, v in out.items()}, f"{out_dir}/{job['id']}.safetensors")
    logs[job["id"]] = list(Keep.lines)
json.dump(logs, open(f"{out_dir}/logs.json", "w"))
"""


def lora_locon_file():
    """A plain LoRA on the Linear (alpha 2 of rank 4) and a kohya LoCon on the 3x3 conv (alpha 3 of rank 2) with a
    full bias difference beside it (as ComfyUI's trainer writes)."""
    lin, conv = A.kohya(A.LINEAR), A.kohya(A.CONV)
    return {f"{lin}.lora_down.weight": A.rand(4, 32, seed=50), f"{lin}.lora_up.weight": A.rand(32, 4, seed=51),
            f"{lin}.alpha": torch.tensor(2.0), f"{conv}.lora_down.weight": A.rand(2, 32, 3, 3, seed=52),
            f"{conv}.lora_up.weight": A.rand(64, 2, 1, 1, seed=53), f"{conv}.alpha": torch.tensor(3.0),
            f"{conv}.diff_b": A.rand(64, seed=54)}


FILES = {"lora+locon": lora_locon_file, **{k: (lambda f=f: f()[0]) for k, f in A.CASES.items()},
         "diff": lambda: A.diff_file()[0],
         # ComfyUI fails on a BOFT without alpha (a TypeError it logs, leaving the weight); that case is ours only
         **{k: (lambda f=f: f()[0]) for k, f in A.WEIGHT_DEPENDENT.items() if k != "boft-no-alpha"},
         "plain": A.plain_lora_file}
STRENGTHS = (1.0, 0.6)
#: two files on the same layers, in order: a DoRA after a LoRA and before it, OFT after a LoRA, a set after a LoRA
CHAINS = {"lora>dora": [("plain", 0.8), ("dora-lora", 0.5)], "dora>lora": [("dora-lora", 0.5), ("plain", 0.8)],
          "lora>oft": [("plain", 0.8), ("oft", 0.7)], "lora>boft": [("plain", 0.8), ("boft", 1.0)],
          "dora>dora": [("dora-loha", 0.7), ("dora-lora", 1.0)]}
JOBS = {**{f"{case}@{s}": [(case, s)] for case in FILES if case != "plain" for s in STRENGTHS}, **CHAINS}


@pytest.fixture(scope="module")
def comfy(tiny_handles, tmp_path_factory):
    """``(files, base weights, {job: (ComfyUI's weights, its log lines)})``, from one run of ComfyUI's python."""
    handle = tiny_handles["sd1"]
    root = tmp_path_factory.mktemp("comfy_adapters")
    files = {}
    for case, make in FILES.items():
        files[case] = root / f"{case}.safetensors"
        save_file(make(), str(files[case]))
    base = {n: p.detach().float().clone() for n, p in handle.base.unet.named_parameters()}
    save_file({k: v.contiguous() for k, v in base.items()}, str(root / "base.safetensors"))
    jobs = [{"id": job.replace(">", "_then_"), "patches": [[str(files[c]), s] for c, s in patches]}
            for job, patches in JOBS.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    python = harness.comfyui_python(Path(_COMFYUI_DIR).resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run([python, "-c", _SCRIPT, str(Path(_COMFYUI_DIR).resolve()), str(root / "jobs.json"),
                           str(root / "base.safetensors"), str(root)], capture_output=True, text=True, timeout=600,
                          cwd=str(_COMFYUI_DIR), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = json.loads((root / "logs.json").read_text())
    results = {job: (load_file(str(root / f"{job.replace('>', '_then_')}.safetensors")),
                     logs[job.replace(">", "_then_")]) for job in JOBS}
    return files, base, results


@pytest.mark.parametrize("job", list(JOBS))
def test_add_lora_gives_the_weights_comfyui_gives(tiny_handles, comfy, job):
    handle = tiny_handles["sd1"]
    files, base, results = comfy
    theirs, log = results[job]
    theirs, base = dict(theirs), dict(base)
    assert theirs, "ComfyUI patched nothing"
    assert not any("lora key not loaded" in line for line in log), log  # ComfyUI took every key of the files
    patched = handle
    for case, strength in JOBS[job]:
        weights, unmatched = lora_for_handle(files[case], handle)
        assert unmatched == A.NOT_APPLIED.get(case, [])
        patched = patched.with_patch(LoraPatch(weights, strength, 1.0))
    if job.startswith("lokr-t2"):
        # ComfyUI (a125cd84, torch 2.13) fails on a CP-decomposed LoKr conv: torch.kron of the non-contiguous einsum
        # result raises "view size is not compatible", which its loader logs ("ERROR lokr ...") before leaving the
        # weight unchanged. Ours applies the format's formula (checked against the definition in test_adapters);
        # the layer is compared to the definition there and left out here.
        conv = f"{A.CONV}.weight"
        if any("view size is not compatible" in line for line in log) and torch.equal(theirs[conv], base[conv]):
            theirs.pop(conv)
            base.pop(conv)
    else:
        assert not any(line.startswith("ERROR") for line in log), log
    unet = handle.base.unet
    with patched.patched():
        ours = {n: p.detach().float().clone() for n, p in unet.named_parameters()}
    changed = [n for n in base if not torch.equal(ours[n], base[n])]
    assert sorted(changed) == sorted(theirs), (changed, sorted(theirs))
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, rtol=1e-5, atol=1e-6), (name, float((ours[name] - value).abs().max()))
