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

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

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


def folder_paths_for(key: str) -> list[Path]:
    """All folders searched for ``key`` (checkpoints, loras, embeddings, diffusers)."""
    if in_comfyui():
        return [Path(p) for p in _fp().get_folder_paths(key)]
    return [models_dir() / key]


def list_files(key: str, extensions: Iterable[str] = MODEL_EXTENSIONS) -> list[str]:
    """Relative file names (with sub-folders, ``/``-separated) under the folders for ``key``."""
    exts = tuple(extensions)
    if in_comfyui() and key != "diffusers":
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
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        return None
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        return None
    for root in folder_paths_for(key):
        candidate = (root / Path(*parts)).resolve()
        try:
            candidate.relative_to(root.resolve())
        except ValueError:
            continue
        if candidate.exists():
            return candidate
    return None


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

    path = Path(comfy.__file__).parent / "sd1_tokenizer"
    return path if (path / "vocab.json").exists() else None


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

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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
    from .core.errors import Interrupted  # noqa: PLC0415

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
        from .core.errors import Interrupted  # noqa: PLC0415

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
def send_event(event: str, data: dict) -> None:
    """Send a namespaced event to the browser (ComfyUI) or to registered headless sinks."""
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
