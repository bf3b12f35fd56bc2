"""Loading base models: diffusers folders, single-file checkpoints, hub ids, the built-in demo.

Single-file checkpoints (the A1111/ComfyUI kind) need no network: family and architecture
are inferred from the tensors (:mod:`.ldm`), the tokenizer comes from an offline source
(:mod:`.tokenizer`) and the scheduler from the family's defaults. Untrusted files load
through safetensors, or ``torch.load(weights_only=True)`` for legacy pickles, never a full
unpickle. Loading the same file twice with the same dtype and device returns the same
:class:`BaseModel` while a handle to it is alive.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

from .. import host
from .atomic import atomic_write
from .errors import FinetuneError
from .families import Family, default_scheduler_config, info
from .handle import BaseModel, ModelHandle
from .kolors import is_chatglm_folder, load_chatglm, load_chatglm_tokenizer
from .ldm import ldm_to_diffusers
from .safeio import load_weights  # the one place untrusted weight files are opened
from .tiny import build_tiny_kolors_folder, build_tiny_pipeline_folder
from .tokenizer import find_clip_tokenizer, load_tokenizer

log = logging.getLogger("comfy_finetune")

DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEMO_NAME = "[built-in] demo-tiny (untrained, for trying the pack)"
SHAPES_NAME = "[built-in] shapes-tiny"
KOLORS_DEMO_NAME = "[built-in] kolors-tiny (untrained, Kolors layout)"
#: The pretrained tiny SD 1.x model of the shapes world that ships with the pack (see shapes/train_base.py).
SHAPES_FOLDER = Path(__file__).resolve().parent.parent / "shapes" / "shapes-tiny"
DEFAULT_MODEL = SHAPES_NAME

_cache: weakref.WeakValueDictionary[tuple, BaseModel] = weakref.WeakValueDictionary()


def resolve_device(device: str):
    import torch  # noqa: PLC0415

    if device == "auto":
        device = host.torch_device_name()
    if device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("CUDA was requested but torch sees no CUDA device", input="device",
                            fix="choose 'auto' or 'cpu'")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FinetuneError("MPS was requested but is not available", input="device",
                            fix="choose 'auto' or 'cpu'")
    if device not in DEVICES:
        raise FinetuneError(f"unknown device '{device}'", input="device",
                            fix=f"use one of {', '.join(DEVICES)}")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> Any:
    import torch  # noqa: PLC0415

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise FinetuneError(f"unknown dtype '{dtype}'", input="dtype",
                            fix=f"use one of {', '.join(DTYPES)}")
    return table[dtype]




# --------------------------------------------------------------------------------------------- state dicts
def read_state_dict(path: str | os.PathLike, *, node: str | None = None, input: str = "ckpt_name"
                    ) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a weights file, through :mod:`.safeio` (validated safetensors, or a legacy pickle
    through ``weights_only``); non-tensor entries of a pickle are dropped."""
    import torch  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"file not found: {path}", node=node, input=input,
                            fix="pick a file from the list, or refresh the node list")

    obj, metadata = load_weights(path, node=node, input=input)
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not obj:
            raise FinetuneError(f"'{path.name}' holds no tensors", node=node, input=input,
                                fix="check that this is a model weights file")
    return obj, metadata


# --------------------------------------------------------------------------------------------- loaders
def _finish(base_kwargs: dict, dtype, device) -> BaseModel:
    import torch  # noqa: PLC0415

    family: Family = base_kwargs["family"]
    unet, vae, tes = base_kwargs["unet"], base_kwargs["vae"], base_kwargs["text_encoders"]
    # The SDXL VAE (Kolors uses it too) overflows in fp16 (diffusers `force_upcast`): keep it in fp32 then.
    vae_dtype = torch.float32 if (family in (Family.SDXL, Family.KOLORS) and dtype == torch.float16) else dtype
    # nn.Module.to, not diffusers' override: it would warn about fp32-pinned modules these models do not have.
    for module, want in [(unet, dtype), (vae, vae_dtype), *[(te, dtype) for te in tes]]:
        first = next(module.parameters())
        if first.dtype != want or first.device != device:
            torch.nn.Module.to(module, device=device, dtype=want)
    for module in [unet, vae, *tes]:
        module.eval()
        module.requires_grad_(False)
    return BaseModel(dtype=dtype, device=device, **base_kwargs)


def _prediction_from_scheduler(cfg: dict) -> str:
    return cfg.get("prediction_type", "epsilon")


def load_diffusers_folder(folder: str | os.PathLike, dtype, device, *, label: str = "") -> BaseModel:
    """A diffusers pipeline folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise FinetuneError(f"'{folder}' is not a diffusers model folder (no model_index.json)", input="ckpt_name",
                            fix="pick a folder saved with save_pretrained, or a .safetensors file")
    index = json.loads(index_path.read_text())
    sdxl = (folder / "text_encoder_2").is_dir()
    if "text_encoder" not in index or not (folder / "unet").is_dir():
        raise FinetuneError(f"'{folder.name}' is not a supported Stable Diffusion pipeline "
                            f"({index.get('_class_name')})", input="ckpt_name",
                            fix="use an SD 1.x, SD 2.x or SDXL base model")
    def part(name: str, fn):
        try:
            return fn()
        except FinetuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers/transformers raise many types for broken folders
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise FinetuneError(f"the '{name}' part of '{folder.name}' could not be loaded ({first})",
                                input="ckpt_name",
                                fix=f"check that {folder.name}/{name} is complete (config and weights), or "
                                    "re-download the model") from exc

    unet = part("unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True))
    vae = part("vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True))
    kolors_unet = unet.config.get("encoder_hid_dim_type") == "text_proj"
    if is_chatglm_folder(folder / "text_encoder") or kolors_unet:
        return _finish_kolors(folder, index, unet, vae, part, dtype, device, label=label)
    tes = [part("text_encoder", lambda: CLIPTextModel.from_pretrained(folder / "text_encoder",
                                                                     local_files_only=True))]
    toks = [part("tokenizer", lambda: load_tokenizer(folder / "tokenizer"))]
    if sdxl:
        tes.append(part("text_encoder_2", lambda: CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", local_files_only=True)))
        toks.append(part("tokenizer_2", lambda: load_tokenizer(folder / "tokenizer_2")))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text()) if sched_path.exists() else {}
    if sdxl:
        family = Family.SDXL
    else:
        family = Family.SD2 if unet.config.use_linear_projection or tes[0].config.hidden_size == 1024 else Family.SD1
    prediction = _prediction_from_scheduler(sched)
    sched = {**default_scheduler_config(family, prediction), **sched}
    return _finish(dict(family=family, prediction_type=prediction, unet=unet, vae=vae, text_encoders=tes,
                        tokenizers=toks, scheduler_config=sched, source=str(folder), label=label or folder.name),
                   dtype, device)


def _finish_kolors(folder: Path, index: dict, unet, vae, part, dtype, device, *, label: str) -> BaseModel:
    """A Kolors folder (``KolorsPipeline``'s layout): the UNet projects ChatGLM3 states (``encoder_hid_proj``,
    ``encoder_hid_dim_type: text_proj``), text_encoder/ is ChatGLM3 and tokenizer/ its SentencePiece model."""
    if not is_chatglm_folder(folder / "text_encoder"):
        raise FinetuneError(f"'{folder.name}' has a Kolors UNet (it projects ChatGLM3 text states) but its "
                            "text_encoder/ is not ChatGLM3 (config.json model_type is not 'chatglm')",
                            input="ckpt_name", fix="put Kolors' own text_encoder/ (ChatGLM3-6B) and tokenizer/ "
                                                   "folders next to its unet/, as in the Kolors-diffusers layout")
    if unet.config.get("encoder_hid_dim_type") != "text_proj":
        raise FinetuneError(f"'{folder.name}' has a ChatGLM3 text encoder but its UNet has no text projection "
                            "(encoder_hid_dim_type is not 'text_proj'): it is not a Kolors UNet",
                            input="ckpt_name", fix="use Kolors' own unet/ folder with its text encoder")
    tok = load_chatglm_tokenizer(folder / "tokenizer")  # first: a missing tokenizer fails before 12 GB are read
    te = part("text_encoder", lambda: load_chatglm(folder / "text_encoder"))
    if int(te.config.hidden_size) != int(unet.config.encoder_hid_dim):
        raise FinetuneError(f"'{folder.name}': the text encoder is {te.config.hidden_size} wide but the UNet "
                            f"projects {unet.config.encoder_hid_dim}-wide states", input="ckpt_name",
                            fix="use the text encoder that belongs to this Kolors UNet")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text()) if sched_path.exists() else {}
    prediction = _prediction_from_scheduler(sched)
    sched = {**default_scheduler_config(Family.KOLORS, prediction), **sched}
    return _finish(dict(family=Family.KOLORS, prediction_type=prediction, unet=unet, vae=vae, text_encoders=[te],
                        tokenizers=[tok], scheduler_config=sched, source=str(folder), label=label or folder.name),
                   dtype, device)


def _materialize(cls, config, state_dict: dict, *, what: str, name: str):
    """Build ``cls(config)`` without random init (meta device) and assign the checkpoint's tensors."""
    import torch  # noqa: PLC0415

    with torch.device("meta"):
        model = cls(**config) if isinstance(config, dict) else cls(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise FinetuneError(
            f"the {what} weights in '{name}' do not fit the inferred architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})",
            input="ckpt_name", fix="the file may be damaged or of an unsupported kind")
    for mod_name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner = model.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else model
            leaf = mod_name.rsplit(".", 1)[-1]
            if leaf == "position_ids":
                owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            else:  # pragma: no cover - no such buffer in SD components today
                raise FinetuneError(f"cannot initialise buffer {mod_name} of the {what}")
    return model


def _prediction_for_single_file(path: Path, family: Family, metadata: dict, hint: str | None, unet_sd: dict) -> str:
    yaml = path.with_suffix(".yaml")
    if yaml.exists():
        text = yaml.read_text(errors="replace")
        if "parameterization" in text and '"v"' in text.replace("'", '"'):
            return "v_prediction"
        return "epsilon"
    for key in ("modelspec.prediction_type", "modelspec.predict_key"):
        value = metadata.get(key)
        if value:
            return "v_prediction" if value.lower().startswith("v") else "epsilon"
    if hint == "v":
        return "v_prediction"
    if family is Family.SD2:
        # ComfyUI's heuristic (supported_models.SD20.model_type): v models have a wider spread here.
        w = unet_sd.get("up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias")
        if w is not None:
            return "v_prediction" if float(w.float().std()) > 0.09 else "epsilon"
        return "v_prediction"
    return "epsilon"


def load_single_file(path: str | os.PathLike, dtype, device, *, label: str = "") -> BaseModel:
    """An A1111/ComfyUI single-file checkpoint (``model.diffusion_model.*`` keys), fully offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    conv = ldm_to_diffusers(state_dict)
    del state_dict
    family = conv.family
    unet = _materialize(UNet2DConditionModel, conv.unet_config, conv.unet, what="UNet", name=path.name)
    vae_cfg = dict(conv.vae_config)
    vae_cfg.setdefault("scaling_factor", info(family).latent_scale)
    vae = _materialize(AutoencoderKL, vae_cfg, conv.vae, what="VAE", name=path.name)
    tes, toks = [], []
    for i, (cfg, sd) in enumerate(zip(conv.text_configs, conv.text_encoders)):
        cls = CLIPTextModelWithProjection if (family is Family.SDXL and i == 1) else CLIPTextModel
        tes.append(_materialize(cls, CLIPTextConfig(**cfg), sd, what=f"text encoder {i + 1}", name=path.name))
        pad = info(family).te_pad_ids[min(i, len(info(family).te_pad_ids) - 1)]
        toks.append(find_clip_tokenizer(pad, vocab_size=int(cfg["vocab_size"])))
    prediction = _prediction_for_single_file(path, family, metadata, conv.prediction_hint, conv.unet)
    return _finish(dict(family=family, prediction_type=prediction, unet=unet, vae=vae, text_encoders=tes,
                        tokenizers=toks, scheduler_config=default_scheduler_config(family, prediction),
                        source=str(path), label=label or path.name), dtype, device)


def load_hub(repo_id: str, dtype, device) -> BaseModel:
    """A hub id (needs network once; afterwards the Hugging Face cache)."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    try:
        # Only what the pipeline folders need: configs, tokenizers and the components' weights (repos also hold
        # multi-GB single-file checkpoints at the top level, and fp16/EMA/safety-checker variants).
        folder = snapshot_download(repo_id, allow_patterns=["model_index.json", "*/*.json", "*/*.txt",
                                                            "unet/*.safetensors", "vae/*.safetensors",
                                                            "text_encoder*/*.safetensors"],
                                   ignore_patterns=["*.fp16.safetensors", "*ema*", "*non_ema*"])
    except Exception as exc:  # noqa: BLE001
        raise FinetuneError(f"could not fetch '{repo_id}' from the Hugging Face hub ({type(exc).__name__}: {exc})",
                            input="hub_id",
                            fix="check the id and your connection, or download the model into "
                                "models/diffusers") from exc
    return load_diffusers_folder(folder, dtype, device, label=repo_id)


def _built_in(name: str, build) -> Path:
    """A built-in model folder in the cache, built locally on first use (no download)."""
    folder = host.cache_dir() / name
    if not (folder / "model_index.json").exists():
        try:  # every data-parallel process loads it, so every process may build it
            atomic_write(folder, build, folder=True, overwrite=False, every_process=True)
        except FileExistsError:  # another process won the race: use theirs (the same seed, the same weights)
            pass
    return folder


def demo_folder() -> Path:
    """The untrained built-in demo model (tiny SD 1.x)."""
    return _built_in("demo-tiny-sd1", lambda tmp: build_tiny_pipeline_folder(tmp, Family.SD1, seed=0))


def kolors_demo_folder() -> Path:
    """The untrained built-in tiny Kolors (ChatGLM3 of two layers, SentencePiece tokenizer): Kolors end to end on
    any machine."""
    return _built_in("kolors-tiny", lambda tmp: build_tiny_kolors_folder(tmp, seed=0))


def available_models() -> list[str]:
    """Names LoadBase offers: the built-in models, checkpoints files, diffusers folders."""

    names = [SHAPES_NAME, DEMO_NAME, KOLORS_DEMO_NAME]
    names += host.list_files("checkpoints")
    names += [f"diffusers/{n}" for n in host.list_diffusers_folders()]
    return names


def load_base(name: str, dtype: str = "auto", device: str = "auto", hub_id: str = "") -> ModelHandle:
    """Resolve a LoadBase choice to a handle, reusing an already loaded base when possible."""

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if hub_id.strip():
        key: tuple = ("hub", hub_id.strip(), str(dt), str(dev))
        loader = lambda: load_hub(hub_id.strip(), dt, dev)  # noqa: E731
    elif name == SHAPES_NAME:
        folder = SHAPES_FOLDER
        if not (folder / "model_index.json").exists():
            raise FinetuneError("the built-in shapes-tiny model is missing from the installed pack", input="ckpt_name",
                                fix="reinstall the pack, or rebuild it with "
                                "python -m comfy_finetune.shapes.train_base --force")
        key = ("shapes", str(folder), str(dt), str(dev))
        loader = lambda: load_diffusers_folder(folder, dt, dev, label="shapes-tiny")  # noqa: E731
    elif name == DEMO_NAME:
        folder = demo_folder()
        key = ("demo", str(folder), str(dt), str(dev))
        loader = lambda: load_diffusers_folder(folder, dt, dev, label="demo-tiny (untrained)")  # noqa: E731
    elif name == KOLORS_DEMO_NAME:
        folder = kolors_demo_folder()
        key = ("kolors-demo", str(folder), str(dt), str(dev))
        loader = lambda: load_diffusers_folder(folder, dt, dev, label="kolors-tiny (untrained)")  # noqa: E731
    else:
        if name.startswith("diffusers/"):
            path = host.resolve_model("diffusers", name[len("diffusers/"):])
        else:
            path = host.resolve_model("checkpoints", name)
        if path is None:
            raise FinetuneError(f"model '{name}' was not found in the models folders", input="ckpt_name",
                                fix="put the file in models/checkpoints (or a diffusers folder in "
                                "models/diffusers) and refresh, or pick another entry")
        stat = path.stat()
        key = ("file", str(path), stat.st_mtime_ns, stat.st_size, str(dt), str(dev))
        if path.is_dir():
            loader = lambda: load_diffusers_folder(path, dt, dev)  # noqa: E731
        else:
            loader = lambda: load_single_file(path, dt, dev)  # noqa: E731
    base = _cache.get(key)
    if base is None:
        import torch  # noqa: PLC0415

        host.free_host_models()
        # ComfyUI runs nodes under inference_mode; weights made there could never be trained through
        # ("Inference tensors cannot be saved for backward"), so the base is built outside it.
        with torch.inference_mode(False):
            base = loader()
        _cache[key] = base
    return ModelHandle(base)
