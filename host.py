"""The one module that talks to ComfyUI.

Everything ComfyUI-specific goes through here: model folders, output/input folders,
progress bars, interrupt checks and freeing the host's own models. When the pack runs
headless (tests, ``python -m comfy_finetune``) every function falls back to a plain
implementation: folders under a models directory (``--models`` flag or the
``COMFY_FINETUNE_MODELS`` environment variable) with ComfyUI's sub-folder names,
tqdm progress bars, and Ctrl-C for cancel.

We never import ComfyUI ourselves: we only use it when the host has already loaded it
(``folder_paths`` and ``comfy.model_management`` in ``sys.modules``).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .core.errors import FinetuneError, Interrupted
from .core.families import Family

log = logging.getLogger("comfy_finetune")

MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
FOLDER_KEYS = ("checkpoints", "loras", "embeddings", "diffusers")


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process that has loaded its own modules."""
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules and not _settings.force_headless


class _Settings:
    def __init__(self) -> None:
        self.models_dir: Path | None = None
        self.output_dir: Path | None = None
        self.input_dir: Path | None = None
        self.force_headless = False
        self.interrupted = threading.Event()
        self.progress_enabled = True
        self.event_sinks: list[Callable[[str, dict], None]] = []


_settings = _Settings()


def configure(*, models_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
              input_dir: str | os.PathLike | None = None, progress: bool | None = None) -> None:
    """Set the headless folders (ignored inside ComfyUI, which has its own)."""
    if models_dir is not None:
        _settings.models_dir = Path(models_dir).resolve()
    if output_dir is not None:
        _settings.output_dir = Path(output_dir).resolve()
    if input_dir is not None:
        _settings.input_dir = Path(input_dir).resolve()
    if progress is not None:
        _settings.progress_enabled = progress


def _fp():
    import folder_paths  # noqa: PLC0415 - only reached inside ComfyUI

    return folder_paths


# ---------------------------------------------------------------------------------------------- folders
def models_dir() -> Path:
    if _settings.models_dir is not None:
        return _settings.models_dir
    env = os.environ.get("COMFY_FINETUNE_MODELS")
    if env:
        return Path(env).resolve()
    return Path.cwd() / "models"


#: Model folders ComfyUI itself does not declare; the pack declares them (as the IP-Adapter and InstantID node packs
#: do: ``models/<key>``, ComfyUI's weight extensions) unless another pack or extra_model_paths.yaml already did.
EXTRA_MODEL_FOLDERS = ("ipadapter", "instantid", "insightface")


def _declare(key: str) -> None:
    fp = _fp()
    if key in EXTRA_MODEL_FOLDERS and key not in fp.folder_names_and_paths:
        fp.folder_names_and_paths[key] = ([os.path.join(fp.models_dir, key)], set(fp.supported_pt_extensions))


def folder_paths_for(key: str) -> list[Path]:
    """All folders searched for ``key`` (checkpoints, loras, embeddings, diffusers, clip_vision, ipadapter, ...)."""
    if in_comfyui():
        _declare(key)
        return [Path(p) for p in _fp().get_folder_paths(key)]
    return [models_dir() / key]


def list_files(key: str, extensions: Iterable[str] = MODEL_EXTENSIONS) -> list[str]:
    """Relative file names (with sub-folders, ``/``-separated) under the folders for ``key``."""
    exts = tuple(extensions)
    if in_comfyui() and key != "diffusers":
        _declare(key)
        return sorted(n.replace(os.sep, "/") for n in _fp().get_filename_list(key) if n.lower().endswith(exts))
    names: set[str] = set()
    for root in folder_paths_for(key):
        if not root.is_dir():
            continue
        real_root = root.resolve()
        for path in root.rglob("*"):
            if path.is_file() and path.name.lower().endswith(exts):
                try:  # list only what resolve_model will load: nothing that leads out of the folder
                    path.resolve().relative_to(real_root)
                except ValueError:
                    continue
                names.add(path.relative_to(root).as_posix())
    return sorted(names)


def list_diffusers_folders() -> list[str]:
    """Sub-folders of models/diffusers that hold a ``model_index.json``."""
    names: set[str] = set()
    for root in folder_paths_for("diffusers"):
        if not root.is_dir():
            continue
        for index in root.rglob("model_index.json"):
            names.add(index.parent.relative_to(root).as_posix())
    return sorted(names)


def resolve_model(key: str, name: str) -> Path | None:
    """Absolute path of ``name`` inside the folders for ``key``; ``None`` if missing.

    The name never escapes its folder: ``..``, absolute paths and links pointing outside
    resolve to ``None``.
    """
    if not usable_name(name) or os.path.isabs(name) or name.startswith(("/", "\\")):
        return None
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        return None
    for root in folder_paths_for(key):
        try:
            candidate = (root / Path(*parts)).resolve()
            candidate.relative_to(root.resolve())
            if candidate.exists():
                return candidate
        except (ValueError, OSError):  # outside the folder, or a name the OS cannot look up
            continue
    return None


def usable_name(name: object) -> bool:
    """A file name from a workflow we are willing to look up: text, no NUL/control characters, sane length."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return all(len(part.encode("utf-8")) <= 255 for part in name.replace("\\", "/").split("/"))


def output_dir() -> Path:
    if in_comfyui():
        return Path(_fp().get_output_directory())
    return _settings.output_dir or (Path.cwd() / "output")


def input_dir() -> Path:
    if in_comfyui():
        return Path(_fp().get_input_directory())
    return _settings.input_dir or (Path.cwd() / "input")


def temp_dir() -> Path:
    if in_comfyui():
        return Path(_fp().get_temp_directory())
    return output_dir() / ".temp"


def cache_dir() -> Path:
    """Where the pack keeps things it can rebuild (the demo model, encoded-latent caches)."""
    env = os.environ.get("COMFY_FINETUNE_CACHE")
    if env:
        return Path(env)
    return models_dir() / "comfy_finetune_cache"


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled CLIP tokenizer folder, when running inside ComfyUI."""
    if not in_comfyui():
        return None
    import comfy  # noqa: PLC0415

    # ComfyUI's comfy/ has no __init__.py: a namespace package, whose __file__ is None; __path__ lists its folder
    folders = [Path(comfy.__file__).parent] if getattr(comfy, "__file__", None) else \
        [Path(p) for p in getattr(comfy, "__path__", [])]
    for folder in folders:
        path = folder / "sd1_tokenizer"
        if (path / "vocab.json").exists():
            return path
    return None


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """Progress over ``total`` steps: ComfyUI's bar on the node, or tqdm headless.

    ``update`` also checks for cancel and raises the host's interrupt exception.
    """

    def __init__(self, total: int, desc: str = "") -> None:
        self.total = max(int(total), 1)
        self.value = 0
        self._bar = None
        self._tqdm = None
        if in_comfyui():
            import comfy.utils  # noqa: PLC0415

            self._bar = comfy.utils.ProgressBar(self.total)
        elif _settings.progress_enabled:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._tqdm = tqdm(total=self.total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        check_interrupt()
        self.value += n
        if self._bar is not None:
            self._bar.update_absolute(self.value, self.total)
        if self._bar is not None and postfix:
            _send_progress_text(" ".join(f"{k} {_fmt(v)}" for k, v in postfix.items()))
        if self._tqdm is not None:
            self._tqdm.update(n)
            if postfix:
                self._tqdm.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                       refresh=False)

    def preview(self, images: Any, **info: Any) -> None:
        """Show validation samples: on the running node (the host's progress preview) and in a
        ``comfy_finetune.train_preview`` event carrying a small base64 JPEG plus ``info`` (node, step, ...).

        Headless the event goes to the registered sinks only; nothing is encoded when nobody listens.
        """
        if self._bar is None and not _settings.event_sinks:
            return
        image = preview_image(images)
        if image is None:
            return
        if self._bar is not None:
            try:
                self._bar.update_absolute(self.value, self.total, ("JPEG", image, PREVIEW_MAX_SIZE))
            except interrupt_exception_types():
                raise
            except Exception:  # pragma: no cover - an older host without previews: the event still goes
                log.debug("could not send the preview to the progress bar", exc_info=True)
        small = image.copy()
        small.thumbnail((EVENT_PREVIEW_MAX_SIZE, EVENT_PREVIEW_MAX_SIZE))
        send_event("comfy_finetune.train_preview", {**info, "width": small.width, "height": small.height,
                                                     "image": "data:image/jpeg;base64," + _jpeg_base64(small)})

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


PREVIEW_MAX_SIZE = 512  # the host's progress preview (longest side, pixels)
EVENT_PREVIEW_MAX_SIZE = 256  # the base64 JPEG in comfy_finetune.train_preview events
PREVIEW_MAX_IMAGES = 4


def preview_image(images: Any):
    """A PIL image of an IMAGE batch ([B, H, W, C] floats in 0..1): the first few side by side; ``None`` if empty."""

    if images is None or getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
        return None
    batch = images[:PREVIEW_MAX_IMAGES].detach().float().clamp(0, 1).cpu()
    if batch.shape[-1] == 1:
        batch = batch.expand(-1, -1, -1, 3)
    row = batch[..., :3].permute(1, 0, 2, 3).reshape(batch.shape[1], -1, 3)  # H, B*W, 3
    return Image.fromarray((row.numpy() * 255.0 + 0.5).astype(np.uint8), "RGB")


def _jpeg_base64(image) -> str:

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def show_text(text: str) -> None:
    """A line of text on the running node in ComfyUI's frontend (e.g. which checkpoint a trainer kept); nothing
    headless (the caller logs it)."""
    if in_comfyui() and text:
        _send_progress_text(text)


def _send_progress_text(text: str) -> None:
    """Show a line of text (e.g. the loss) on the running node in ComfyUI's frontend."""
    try:
        from comfy_execution.utils import get_executing_context  # noqa: PLC0415
        from server import PromptServer  # noqa: PLC0415

        context = get_executing_context()
        server = PromptServer.instance
        node_id = context.node_id if context is not None else server.last_node_id
        if node_id is not None:
            server.send_progress_text(text, node_id, server.client_id)
    except Exception:  # pragma: no cover - older hosts lack these; progress text is cosmetic
        log.debug("could not send progress text", exc_info=True)


# ---------------------------------------------------------------------------------------------- interrupt
def interrupt_exception_types() -> tuple[type[BaseException], ...]:

    types: list[type[BaseException]] = [Interrupted, KeyboardInterrupt]
    if in_comfyui():
        import comfy.model_management as mm  # noqa: PLC0415

        types.append(mm.InterruptProcessingException)
    return tuple(types)


def request_interrupt() -> None:
    """Ask the running job to stop at its next check (headless; ComfyUI uses /interrupt)."""
    _settings.interrupted.set()


def check_interrupt() -> None:
    """Raise if the user asked to cancel: ComfyUI's exception in the host, ``Interrupted`` headless."""
    if in_comfyui():
        import comfy.model_management as mm  # noqa: PLC0415

        mm.throw_exception_if_processing_interrupted()
        return
    if _settings.interrupted.is_set():
        _settings.interrupted.clear()

        raise Interrupted("cancelled by the user")


# ---------------------------------------------------------------------------------------------- memory
def free_host_models() -> None:
    """Unload the models ComfyUI manages so ours fit; empty the CUDA cache. No-op headless on CPU."""
    if in_comfyui():
        try:
            import comfy.model_management as mm  # noqa: PLC0415

            mm.unload_all_models()
            mm.soft_empty_cache()
        except Exception:  # pragma: no cover - defensive: never fail a node over cleanup
            log.warning("could not free ComfyUI's models", exc_info=True)
        return
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def torch_device_name() -> str:
    """The host's preferred torch device ('cuda', 'mps' or 'cpu')."""
    if in_comfyui():
        import comfy.model_management as mm  # noqa: PLC0415

        return str(mm.get_torch_device().type)
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------------------------------------- events
def executing_node() -> dict[str, str]:
    """Ids of the node ComfyUI is running now: ``{"node_id": ..., "display_node": ...}`` (the display id is the
    one the frontend's graph knows, which differs from ``node_id`` inside subgraphs); ``{}`` headless or unknown."""
    if not in_comfyui():
        return {}
    try:
        from comfy_execution.utils import get_executing_context  # noqa: PLC0415

        context = get_executing_context()
        if context is None or context.node_id is None:
            return {}
        node_id = str(context.node_id)
        display = node_id
        try:
            from comfy_execution.progress import get_progress_state  # noqa: PLC0415

            display = str(get_progress_state().dynprompt.get_display_node_id(node_id))
        except Exception:  # older hosts: the executing id is the graph's id
            pass
        return {"node_id": node_id, "display_node": display}
    except Exception:  # pragma: no cover - older hosts lack the executing context
        return {}


def send_event(event: str, data: dict) -> None:
    """Send a namespaced event to the browser (ComfyUI) or to registered headless sinks.

    Inside ComfyUI the running node's ids (:func:`executing_node`) are added to ``data`` unless it has them, so the
    frontend can find the node in its graph.
    """
    if in_comfyui():
        data = {**executing_node(), **data}
    for sink in list(_settings.event_sinks):
        sink(event, data)
    if in_comfyui():
        try:
            from server import PromptServer  # noqa: PLC0415

            PromptServer.instance.send_sync(event, data)
        except Exception:  # pragma: no cover
            log.debug("could not send event %s", event, exc_info=True)


def add_event_sink(fn: Callable[[str, dict], None]) -> None:
    _settings.event_sinks.append(fn)


# ---------------------------------------------------------------------------------------------- native models
_LORA_WARNINGS = ("lora key not loaded:", "NOT LOADED ")


class _LoraWarningCapture(logging.Handler):
    """Collects ComfyUI's LoRA-loading warnings (``lora key not loaded: <key>``, ``NOT LOADED <key>``)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # pragma: no cover - a malformed record from someone else
            return
        if text.startswith(_LORA_WARNINGS):
            self.messages.append(text)


def _native_shape_problems(model, clip, state_dict: dict) -> list[str]:
    """LoRA modules whose target weight in the native MODEL/CLIP has another size.

    ComfyUI only notices those when it patches (``WARNING SHAPE MISMATCH ... WEIGHT NOT MERGED`` at sampling time),
    so they are checked up front with the same key map ``load_lora_for_models`` builds.
    """

    import comfy.lora  # noqa: PLC0415
    import comfy.utils  # noqa: PLC0415

    targets = []
    if model is not None:
        targets.append((model.model, comfy.lora.model_lora_keys_unet(model.model, {})))
    if clip is not None:
        targets.append((clip.cond_stage_model, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})))
    problems = []
    for key, down in state_dict.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key[: -len(".lora_down.weight")]
        up = state_dict.get(prefix + ".lora_up.weight")
        if up is None:
            continue
        for root, key_map in targets:
            target = key_map.get(prefix)
            if not isinstance(target, str):
                continue
            try:
                weight = comfy.utils.get_attr(root, target)
            except AttributeError:
                continue
            want = tuple(weight.shape)
            have = (int(up.shape[0]), *(int(s) for s in down.shape[1:]))
            if want[0] != have[0] or math.prod(want) != math.prod(have):
                problems.append(f"{prefix}: LoRA {list(have)} vs native weight {list(want)}")
            break
    return problems


def apply_lora_to_native(model: Any, clip: Any, state_dict: dict, strength_model: float = 1.0,
                         strength_clip: float = 1.0) -> tuple[Any, Any]:
    """Apply a LoRA state dict (kohya or ComfyUI keys) to ComfyUI's own MODEL and CLIP, as ``LoraLoader`` does.

    Calls ``comfy.sd.load_lora_for_models``, which patches **clones**: the inputs are never changed. Every key must
    be applied: ComfyUI's ``lora key not loaded`` / ``NOT LOADED`` warnings during the call, and LoRA modules whose
    native weight has another size (which ComfyUI would skip at sampling time), raise a :class:`FinetuneError`
    listing them. Both strengths 0 return the inputs unchanged (like ``LoraLoader``).

    Headless there are no native models: raises :class:`FinetuneError`.
    """

    if not in_comfyui():
        raise FinetuneError("this node works on ComfyUI's own MODEL and CLIP (from Load Checkpoint and other native "
                            "loaders); the headless runner has no native models", input="model",
                            fix="run the workflow in ComfyUI, or sample headless with AddLoRA and Sample on the "
                                "FT_PIPE")
    if model is None and clip is None:
        raise FinetuneError("neither a MODEL nor a CLIP was given", input="model",
                            fix="connect the MODEL and CLIP outputs of a checkpoint loader")
    if float(strength_model) == 0 and float(strength_clip) == 0:
        return model, clip
    import comfy.sd  # noqa: PLC0415

    state_dict = dict(state_dict)
    capture = _LoraWarningCapture()
    root = logging.getLogger()
    level = root.level
    if root.getEffectiveLevel() > logging.WARNING:  # e.g. --verbose ERROR: the warnings must still be made
        root.setLevel(logging.WARNING)
    root.addHandler(capture)
    try:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, state_dict, float(strength_model),
                                                            float(strength_clip))
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    problems = list(dict.fromkeys(capture.messages))
    problems += _native_shape_problems(model, clip, state_dict)
    if problems:
        raise FinetuneError(f"ComfyUI could not apply {len(problems)} part(s) of the LoRA to this MODEL/CLIP: "
                            + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""), input="model",
                            fix="connect the MODEL and CLIP of the checkpoint the LoRA was trained on (the same one "
                                "the pipe input was loaded from)")
    return new_model, new_clip


# ---------------------------------------------------------------------------------------------- the host's own model
# ComfyUI's model classes (comfy.supported_models) per family this pack trains; subclasses (SSD-1B, unCLIP, x4
# upscaler ...) map to their parent's family and are refused later if their tensors do not fit a plain model.
_NATIVE_FAMILY_CLASSES = (("SDXL", "sdxl"), ("SD20", "sd2"), ("SD15", "sd1"))
_NEEDS_COMFYUI = ("needs ComfyUI: this node reads ComfyUI's own MODEL, CLIP and VAE (from Load Checkpoint and other "
                  "native loaders), which the headless runner does not have")


def _native_family(model) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from the class of ComfyUI's model config (``model.model.model_config``)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    names = [c.__name__ for c in type(config).__mro__] if config is not None else []
    for cls_name, family in _NATIVE_FAMILY_CLASSES:
        if cls_name in names:
            return family
    shown = names[0] if names else type(model).__name__
    raise FinetuneError(f"the MODEL is a {shown} model; this pack trains SD 1.x, SD 2.x and SDXL", input="model",
                        fix="connect the MODEL of an SD 1.x, SD 2.x or SDXL checkpoint, or load a supported model "
                            "with Load Base Model")


def _native_prediction(model) -> tuple[str, dict]:
    """``(prediction type, schedule)`` from the model sampling ComfyUI samples with (object patches such as the
    ModelSamplingDiscrete node included). ComfyUI's discrete schedule is LDM's "linear" one: betas linear in
    sqrt(beta) from ``linear_start`` to ``linear_end`` (diffusers' ``scaled_linear``); ``zsnr`` rescales it to zero
    terminal SNR (diffusers' ``rescale_betas_zero_snr``)."""
    import comfy.model_sampling as ms_mod  # noqa: PLC0415
    import torch  # noqa: PLC0415

    sampling = model.get_model_object("model_sampling")
    # the prediction is the most derived EPS-family mixin of the sampling class that is not itself a Module
    mixin = next((c for c in type(sampling).__mro__
                  if isinstance(c, type) and issubclass(c, ms_mod.EPS) and not issubclass(c, torch.nn.Module)), None)
    kind = {ms_mod.EPS: "epsilon", ms_mod.V_PREDICTION: "v_prediction"}.get(mixin)
    if kind is None or not isinstance(sampling, ms_mod.ModelSamplingDiscrete):
        what = mixin.__name__ if mixin is not None else type(sampling).__name__
        raise FinetuneError(f"the MODEL samples with {what} ({type(sampling).__name__}); this pack trains discrete "
                            "epsilon and v-prediction models", input="model",
                            fix="remove the model-sampling node in front (e.g. ModelSamplingDiscrete set to lcm or "
                                "x0), or connect a plain SD 1.x / 2.x / SDXL MODEL")
    config = getattr(model.model, "model_config", None)
    schedule_name = (getattr(config, "sampling_settings", None) or {}).get("beta_schedule", "linear")
    if schedule_name != "linear":
        raise FinetuneError(f"the MODEL's noise schedule is '{schedule_name}'; SD models use LDM's 'linear' one",
                            input="model", fix="connect a standard SD 1.x / 2.x / SDXL MODEL")
    schedule = {"num_train_timesteps": int(sampling.num_timesteps), "beta_start": float(sampling.linear_start),
                "beta_end": float(sampling.linear_end), "zero_snr": bool(getattr(sampling, "zsnr", False))}
    return kind, schedule


def _native_text_layers(clip, family: str, names: list[str]) -> list[int | None]:
    """How many transformer layers of each text encoder ComfyUI's conditioning reads, for the pack's convention.

    ComfyUI's encoder (``comfy.sd1_clip.SDClipModel``) returns the last layer (``layer="last"``, through the final
    layer norm) or the output of layer ``layer_idx`` (``"hidden"``; negative counts from the end; through the final
    norm when ``layer_norm_hidden_state``). Its defaults: SD 1.x last; SD 2.x layer -2 normed; SDXL both encoders
    layer -2 not normed. ``CLIP Set Last Layer`` (``clip.layer_idx``) overrides the layer of every encoder.
    The pack reads SD 1.x/2.x from the last layer through the final norm (so ComfyUI's layer k, normed, is the pack's
    encoder cut to k + 1 layers) and SDXL from hidden state -2 without the norm (all layers kept).
    """
    out: list[int | None] = []
    for name in names:
        enc = getattr(clip.cond_stage_model, name)
        n = int(enc.num_layers)
        layer, idx = enc.options_default[0], enc.options_default[1]
        if clip.layer_idx is not None and layer != "all":  # SDClipModel.set_clip_options
            if abs(int(clip.layer_idx)) > n:
                layer, idx = "last", None
            else:
                layer, idx = "hidden", int(clip.layer_idx)
        used = n if layer == "last" else (None if layer != "hidden" else (idx + 1 if idx >= 0 else n + idx + 1))
        normed = layer == "last" or bool(getattr(enc, "layer_norm_hidden_state", True))
        if family == "sdxl":
            ok = used == n - 1 and not normed
            keep = None
        else:
            ok = used is not None and normed
            keep = used
        if not ok:
            raise FinetuneError(f"the CLIP's {name} reads layer {idx if layer == 'hidden' else layer} "
                                f"({'with' if normed else 'without'} the final norm), which this pack's "
                                f"{Family(family).label} conditioning cannot reproduce", input="clip",
                            fix="remove CLIP Set Last Layer (or set -1 / -2 for SD 1.x/2.x); SDXL must keep its "
                                "default layer")
        out.append(keep)
    return out


def _native_tensors(patcher, prefix: str, patched: list[str], *, input: str) -> dict:
    """``{name without prefix: tensor}`` of ``patcher``'s model under ``prefix``: the host's own tensors, except the
    ones ``patcher`` carries patches for (LoraLoader, model merges ...), which are new tensors holding the patched
    weight as ComfyUI computes it when it loads the model (``ModelPatcher.patch_weight_to_device``:
    ``comfy.lora.calculate_weight`` on an fp32 copy, rounded back to the weight's dtype), without touching the
    model. A weight ComfyUI has swapped for a patched copy while loaded (``patcher.backup``) is read from its backup,
    the original. The patched ones' names (without prefix) go to ``patched``."""
    import comfy.float  # noqa: PLC0415
    import comfy.lora  # noqa: PLC0415
    import comfy.model_patcher as mp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    out = {}
    for key, tensor in patcher.model_state_dict(prefix).items():
        backup = patcher.backup.get(key)
        if backup is not None:
            tensor = backup.weight
        if not tensor.is_floating_point() or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FinetuneError(f"ComfyUI holds {key} as {tensor.dtype}; this pack trains fp32, fp16 or bf16 "
                                "weights", input=input,
                                fix="load the checkpoint without fp8/quantized weight options, or use Load Base "
                                    "Model")
        if key in patcher.patches:
            _, set_func, convert_func = mp.get_key_weight(patcher.model, key)
            if set_func is not None or convert_func is not None:
                raise FinetuneError(f"{key} is stored in a custom (quantized) format", input=input,
                                    fix="load the checkpoint with ComfyUI's standard loaders, or use Load Base Model")
            with torch.inference_mode(False), torch.no_grad():
                weight = comfy.lora.calculate_weight(patcher.patches[key], tensor.to(torch.float32, copy=True), key)
                tensor = comfy.float.stochastic_rounding(weight, tensor.dtype, seed=mp.string_to_seed(key))
            patched.append(key[len(prefix):])
        out[key[len(prefix):]] = tensor
    return out


def native_model_parts(model: Any, clip: Any, vae: Any) -> dict:
    """ComfyUI's MODEL, CLIP and VAE as plain tensors and facts (for ``core.native.base_from_native``).

    Returns ``{"family", "prediction_type", "schedule", "latent_scale", "unet", "vae", "text_encoders",
    "text_layers", "patched", "notes"}``: ``unet`` and ``vae`` under LDM names, ``text_encoders`` under HF CLIP names
    (SDXL: CLIP-L then bigG), each the host's own tensor (not copied) or, for a weight the MODEL/CLIP carries a
    patch for (e.g. LoraLoader), the patched weight as ComfyUI computes it (``patched`` names those: ``unet``,
    ``vae`` and ``text_encoders``, one list per encoder). What
    ComfyUI applies another way (weight wrappers, attention/object patches, hooks) is not carried over and listed in
    ``notes``. ComfyUI's loaded models are unloaded first (``free_host_models``), so every module holds its
    original weights. Headless: :class:`FinetuneError` (needs ComfyUI).
    """
    if not in_comfyui():
        raise FinetuneError(_NEEDS_COMFYUI, input="model",
                            fix="run the workflow in ComfyUI, or use Load Base Model (FT_PIPE) headless")
    for name, value, attrs in (("model", model, ("model", "patches", "get_model_object")),
                               ("clip", clip, ("cond_stage_model", "patcher")),
                               ("vae", vae, ("first_stage_model", "patcher"))):
        if value is None or not all(hasattr(value, a) for a in attrs):
            raise FinetuneError(f"the {name} input is not ComfyUI's {name.upper()} ({type(value).__name__})",
                                input=name, fix=f"connect the {name.upper()} output of Load Checkpoint")
    family = _native_family(model)
    prediction, schedule = _native_prediction(model)
    free_host_models()

    patched: dict[str, list] = {"unet": [], "vae": [], "text_encoders": []}
    unet = _native_tensors(model, "diffusion_model.", patched["unet"], input="model")
    csm = clip.cond_stage_model
    names = [n for n in ("clip_l", "clip_h", "clip_g") if hasattr(getattr(csm, n, None), "transformer")]
    text_layers = _native_text_layers(clip, family, names)
    texts = []
    for n in names:
        patched["text_encoders"].append([])
        texts.append(_native_tensors(clip.patcher, f"{n}.transformer.", patched["text_encoders"][-1], input="clip"))
    if vae.first_stage_model is None or not hasattr(vae.first_stage_model, "decoder"):
        raise FinetuneError("the VAE is empty or not an SD VAE", input="vae", fix="connect the VAE of Load Checkpoint")
    vae_sd = _native_tensors(vae.patcher, "", patched["vae"], input="vae")

    notes = []
    counts = {"UNet": len(patched["unet"]), "text encoder": sum(map(len, patched["text_encoders"])),
              "VAE": len(patched["vae"])}
    if any(counts.values()):
        notes.append("patched weights (as KSampler sees them) held for " +
                     ", ".join(f"{n} {what} tensors" for what, n in counts.items() if n))
    ignored = []
    if getattr(model, "weight_wrapper_patches", None):
        ignored.append(f"{len(model.weight_wrapper_patches)} weight wrappers (e.g. ComfyUI Train LoRA's model output)")
    others = [k for k in (getattr(model, "object_patches", None) or {}) if k != "model_sampling"]
    if others:
        ignored.append("object patches " + ", ".join(others[:4]))
    options = getattr(model, "model_options", None) or {}
    if any(options.get("transformer_options", {}).get(k) for k in ("patches", "patches_replace")) or \
            any(k != "transformer_options" and v for k, v in options.items()):
        ignored.append("model options (attention patches, sampler functions)")
    if getattr(model, "hook_patches", None) or getattr(clip.patcher, "hook_patches", None):
        ignored.append("hooks")
    if ignored:
        notes.append("not carried over: " + "; ".join(ignored))
    latent_format = getattr(model.model, "latent_format", None)
    return {"family": family, "prediction_type": prediction, "schedule": schedule,
            "latent_scale": float(getattr(latent_format, "scale_factor", 0.0)) or None,
            "unet": unet, "vae": vae_sd, "text_encoders": texts, "text_layers": text_layers, "patched": patched,
            "notes": notes}
