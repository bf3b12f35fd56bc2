"""Real-size SD 1.5 / SDXL architectures with random weights, from the configs shipped in ``configs/``.

For benchmarks and memory checks: the shapes (and so the time, FLOPs and memory of every step) are those of the
real models, but nothing is downloaded. ``configs/<name>/{unet,vae,text_encoder[_2]}.json`` hold the standard
hyper-parameters (diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers' ``CLIPTextConfig``
fields); ``small`` is the SD 1.5 layout at about a tenth of the width, for CPU runs.

Models are built without an fp32 detour: parameters are allocated directly on the target device in the target
dtype (``torch.set_default_dtype`` + a device context), so an SDXL UNet in bf16 never needs its 10 GB fp32 copy.
The tokenizer is the small built-in BPE vocabulary of the tiny models (token ids fit the real 49408-row tables).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from .families import Family, default_scheduler_config
from .handle import ModelHandle
from .loading import _finish
from .tiny import TINY_WORDS
from .tokenizer import build_vocab, load_tokenizer, write_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ARCHITECTURES = {"sd15": Family.SD1, "small": Family.SD1, "sdxl": Family.SDXL}
NATIVE_SIZE = {"sd15": 512, "small": 256, "sdxl": 1024}


def load_configs(name: str) -> dict[str, dict]:
    """The component configs of ``name`` (``sd15``, ``sdxl`` or ``small``) as plain dicts."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{name}'; use one of {', '.join(ARCHITECTURES)}")
    folder = CONFIG_DIR / name
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch  # noqa: PLC0415

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build(factory, dtype, device):
    """``factory()`` with its parameters allocated and initialised directly on ``device`` in ``dtype``."""
    import torch  # noqa: PLC0415

    with _default_dtype(dtype), torch.device(device):
        model = factory()
    return model


def build_base(name: str, dtype: str = "fp32", device: str = "cpu", seed: int = 0) -> Any:
    """A :class:`~.handle.ModelHandle` on a randomly initialised real-size model ``name``."""
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    family = ARCHITECTURES.get(name)
    configs = load_configs(name)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    tokenizers = _tokenizers(build_vocab(TINY_WORDS), family)
    # fp16 init of some layers is not supported on every device: initialise fp16 models in bf16 (same range of
    # values for these inits), and cast once.
    init_dt = torch.bfloat16 if dt == torch.float16 else dt
    torch.manual_seed(seed)

    def clean(cfg: dict) -> dict:
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if not k.startswith("_")}

    unet = _build(lambda: UNet2DConditionModel(**clean(configs["unet"])), init_dt, dev)
    vae = _build(lambda: AutoencoderKL(**clean(configs["vae"])), init_dt, dev)
    tes = []
    for key, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if key not in configs:
            continue
        cfg = {k: v for k, v in configs[key].items() if k not in ("architectures", "model_type")}
        tok = tokenizers[len(tes)]
        cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        tes.append(_build(lambda cfg=cfg, cls=cls: cls(CLIPTextConfig(**cfg)), init_dt, dev))
    base = _finish(dict(family=family, prediction_type="epsilon", unet=unet, vae=vae, text_encoders=tes,
                        tokenizers=tokenizers[:len(tes)],
                        scheduler_config=default_scheduler_config(family, "epsilon"),
                        source=f"[random] {name}", label=f"{name} (random weights)"), dt, dev)
    return ModelHandle(base)


def _tokenizers(vocab_merges, family: Family) -> list:


    vocab, merges = vocab_merges
    out = []
    with tempfile.TemporaryDirectory(prefix="ft-tok-") as tmp:
        pads = ["<|endoftext|>", "!"] if family is Family.SDXL else ["<|endoftext|>"]
        for i, pad in enumerate(pads):
            write_tokenizer(Path(tmp) / f"t{i}", vocab, merges, pad_token=pad)
            out.append(load_tokenizer(Path(tmp) / f"t{i}"))
    return out


def parameter_counts(handle: Any) -> dict[str, int]:
    """Parameters per component (``unet``, ``vae``, ``te1``, ``te2``)."""
    base = handle.base
    parts = {"unet": base.unet, "vae": base.vae, **{f"te{i + 1}": te for i, te in enumerate(base.text_encoders)}}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
