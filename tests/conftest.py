"""Shared fixtures: tiny real-architecture models built once per session, in a temp models folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ATEN_CPU_CAPABILITY=avx2 (how the suite is checked for AVX2 CPUs on a newer machine) caps only ATen's own kernels:
# matmuls still run MKL's and convolutions oneDNN's AVX-512/AMX code, and torch 2.13's bf16 attention then pairs
# oneDNN's AMX packing with ATen's AVX2 pack_vnni2, which raises "pack_vnni2 is only supported when avx512 is
# supported". Cap MKL and oneDNN the same way (both read these on first use), so such a run computes what an AVX2
# machine computes; a value set explicitly wins.
if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "avx2":
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A ComfyUI-style models folder with tiny diffusers models of every family, configured as the host's."""
    from comfy_finetune import host
    from comfy_finetune.core.tiny import build_tiny_pipeline_folder

    root = tmp_path_factory.mktemp("models")
    for sub in ("checkpoints", "loras", "embeddings", "diffusers"):
        (root / sub).mkdir()
    for fam in FAMILIES:
        build_tiny_pipeline_folder(root / "diffusers" / f"tiny-{fam}", fam, seed=0)
    out = tmp_path_factory.mktemp("output")
    inp = tmp_path_factory.mktemp("input")
    host.configure(models_dir=root, output_dir=out, input_dir=inp, progress=False)
    os.environ["COMFY_FINETUNE_CACHE"] = str(root / "cache")
    return root


@pytest.fixture(scope="session")
def tiny_handles(models_dir):
    """family -> ModelHandle over the tiny diffusers folders (fp32, CPU)."""
    from comfy_finetune.core.loading import load_base

    return {fam: load_base(f"diffusers/tiny-{fam}", "fp32", "cpu") for fam in FAMILIES}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with several, OpenMP's spin-waits cost 10-20x on a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------- slow tests
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked @pytest.mark.slow (soak tests); skipped by default")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def offload_moves(monkeypatch) -> list:
    """Every move the training offload makes, in order, as ``(module, device name)``: recorded through
    ``Offload._move`` (on a CPU-only machine both places are RAM, so where a module *is* cannot tell)."""
    from comfy_finetune.training.speed import Offload

    moves: list = []
    real_move = Offload._move

    def move(self, device, modules=None):
        moves.extend((m, str(device)) for m in (self.modules if modules is None else modules))
        real_move(self, device, modules)

    monkeypatch.setattr(Offload, "_move", move)
    return moves


@pytest.fixture(scope="session")
def repo_tool():
    """``repo_tool("import_cycles")``: a script of the repository's tools/ folder loaded as a module."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
