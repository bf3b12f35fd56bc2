"""Writing what the pack trains: LoRAs, textual-inversion embeddings and checkpoints.

Three rules hold for every file:

* **Confined names.** A name typed in a workflow (``finetune/my_lora``) becomes a path inside the first folder of
  its kind (``models/loras`` ...), also through symlinks; absolute paths, ``..``, control characters and Windows
  device names are refused with a message naming the node and input (:func:`safe_name`, :func:`target_path`).
* **No silent overwrite.** An existing file is kept and the new one gets ``<name>_2``, ``_3`` ... unless the
  caller asked to overwrite; the caller reports the final name.
* **Atomic.** Files (and diffusers folders) are written under a hidden temporary name in the same folder and
  renamed into place, so a crash, an error or a cancel never leaves a half-written model
  (:func:`~..core.atomic.atomic_write`).

File layouts: kohya LoRAs, embeddings that ComfyUI and A1111 both read, single-file checkpoints ComfyUI loads and
diffusers folders (each writer below says which keys it writes). Their ModelSpec metadata comes from
:func:`~..core.families.modelspec_keys`, so a LoRA, an embedding and a checkpoint of one model agree.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import host
from ..core.atomic import atomic_write
from ..core.errors import FinetuneError
from ..core.families import Family, check_family, modelspec_keys
from ..core.ldm import diffusers_to_ldm
from ..core.lora import to_diffusers_state_dict, to_kohya_state_dict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.embeddings import Embedding
    from ..core.handle import ModelHandle
    from ..core.lora import LoraWeights

__all__ = [
    "safe_name", "target_path", "relative_name", "save_lora", "save_embedding", "save_checkpoint",
    "LORA_LAYOUTS", "CHECKPOINT_FORMATS", "SAVE_DTYPES",
]

LORA_LAYOUTS = ("kohya", "diffusers")
CHECKPOINT_FORMATS = ("single_file", "diffusers")
SAVE_DTYPES = ("fp16", "bf16", "fp32")

_NAME_FIX = "use a relative name such as 'finetune/my_lora' (sub-folders with '/')"
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"COM{i}" for i in "123456789¹²³"), *(f"LPT{i}" for i in "123456789¹²³")}
_WINDOWS_BAD_CHARS = set('<>:"|?*')
# Bidi embeddings/overrides/isolates: they make "x\u202egpj.safetensors" display as something else.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_MAX_NAME_BYTES = 1024  # the whole relative name; paths stay far below the OS limit (4096)
_MAX_PART_BYTES = 200  # leaves room for "_NN", the extension and the temp-file decoration under 255
_STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


# ============================================================================================== names and paths

def safe_name(name: str, *, node: str | None, input: str | None, where: str = "the models folder") -> str:
    """A workflow-supplied file name as a clean relative path (``/``-separated); refuses anything that could escape.

    Backslashes count as folder separators (Windows habit); empty and ``.`` segments are dropped; trailing dots and
    spaces of a segment are removed (Windows drops them anyway). Unicode letters are kept (NFC-normalised).

    Raises:
        FinetuneError(node, input): empty names, absolute paths (``/x``, ``C:\\x``, ``\\\\server``, ``~``),
            ``..`` segments, control or bidi characters, the characters ``< > : " | ? *``, hidden names (leading
            ``.``), Windows device names (``CON``, ``NUL``, ``COM1`` ... also with an extension) and over-long
            segments.
    """
    def refuse(why: str, fix: str = _NAME_FIX) -> FinetuneError:
        return FinetuneError(f"the name {name!r} {why}", node=node, input=input, fix=fix)

    if not isinstance(name, str):
        raise refuse("is not text")
    text = unicodedata.normalize("NFC", name).strip()
    if not text:
        raise refuse("is empty", fix="type a file name such as 'finetune/my_lora'")
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI_CONTROLS:
            raise refuse(f"contains the control character U+{ord(ch):04X}", fix="type the name again without it")
    if text.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", text):
        raise refuse(f"is an absolute path; saving outside {where} is not allowed")
    bad = sorted({ch for ch in text if ch in _WINDOWS_BAD_CHARS})
    if bad:
        raise refuse(f"contains {' '.join(bad)}, which file names cannot hold on Windows",
                     fix="remove those characters; use '/' for sub-folders")
    parts: list[str] = []
    for raw in text.replace("\\", "/").split("/"):
        part = raw.strip()
        if part in ("", "."):
            continue
        if part == "..":
            raise refuse(f"contains '..'; saving outside {where} is not allowed")
        part = part.rstrip(" .")
        if not part:
            raise refuse(f"has a segment {raw!r} made only of dots")
        if part.startswith("."):
            raise refuse(f"has a hidden segment {part!r} (starting with '.')", fix="remove the leading dot")
        if part.split(".")[0].rstrip().upper() in _WINDOWS_RESERVED:
            raise refuse(f"uses {part.split('.')[0]!r}, a reserved device name on Windows",
                         fix="pick another name, e.g. add a prefix")
        if len(part.encode("utf-8")) > _MAX_PART_BYTES:
            raise refuse(f"has a segment longer than {_MAX_PART_BYTES} bytes", fix="use a shorter name")
        parts.append(part)
    if not parts:
        raise refuse("has no file name in it", fix="type a file name such as 'finetune/my_lora'")
    joined = "/".join(parts)
    if len(joined.encode("utf-8")) > _MAX_NAME_BYTES:
        raise refuse(f"is longer than {_MAX_NAME_BYTES} bytes", fix="use a shorter name and fewer sub-folders")
    return joined


def _first_root(folder_key: str, *, node: str | None, input: str | None) -> Path:
    roots = host.folder_paths_for(folder_key)
    if not roots:
        raise FinetuneError(f"no '{folder_key}' models folder is configured", node=node, input=input,
                            fix=f"add a '{folder_key}' entry to extra_model_paths.yaml or create models/{folder_key}")
    return Path(roots[0])


def _inside(path: Path, real_root: Path) -> bool:
    try:
        path.resolve().relative_to(real_root)
    except ValueError:
        return False
    return True


def target_path(folder_key: str, name: str, ext: str, *, overwrite: bool, node: str | None,
                input: str | None) -> Path:
    """Where to save ``name`` in the first folder for ``folder_key`` (loras, embeddings, checkpoints, diffusers).

    Args:
        folder_key: the host folder kind; the first of its folders is used (created if missing).
        name: the name from the workflow, made safe by :func:`safe_name`; sub-folders are created.
        ext: ``".safetensors"`` (added unless the name already ends with it) or ``""`` for a folder (diffusers).
        overwrite: if False and the target exists, ``<name>_2<ext>``, ``_3`` ... is returned instead.
    Returns:
        The absolute path (under the folder as configured, not symlink-resolved).
    Raises:
        FinetuneError(node, input) for unsafe names, targets that resolve outside the folder (also through a
        symlinked sub-folder or file), or, with ``overwrite``, a file where a folder is wanted or the reverse.
    """
    root = _first_root(folder_key, node=node, input=input)
    rel = safe_name(name, node=node, input=input)
    if ext and not ext.startswith("."):
        ext = "." + ext
    if ext and not rel.lower().endswith(ext.lower()):
        rel += ext
    root.mkdir(parents=True, exist_ok=True)
    real_root = root.resolve()
    path = root / rel

    def escape() -> FinetuneError:
        return FinetuneError(f"'{rel}' leads outside the {folder_key} folder (through a link)", node=node,
                             input=input, fix="pick a name that stays inside the folder")

    if not _inside(path, real_root):
        raise escape()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(path, real_root):  # a link created meanwhile
        raise escape()
    if not os.path.lexists(path):
        return path
    if overwrite:
        want_folder = not ext
        if path.is_dir() != want_folder:
            kind = "folder" if path.is_dir() else "file"
            raise FinetuneError(f"'{rel}' exists as a {kind}; it cannot be replaced by a "
                                f"{'folder' if want_folder else 'file'}", node=node, input=input,
                                fix="pick another name")
        return path
    stem = path.name[: len(path.name) - len(ext)] if ext else path.name
    for i in range(2, 100000):
        candidate = path.with_name(f"{stem}_{i}{ext}")
        if not os.path.lexists(candidate):
            return candidate
    raise FinetuneError(f"too many files named '{stem}_N{ext}'", node=node, input=input, fix="pick another name")


def relative_name(path: str | os.PathLike, folder_key: str) -> str:
    """``path`` relative to the first folder for ``folder_key``, ``/``-separated (for messages)."""
    path = Path(path)
    for root in host.folder_paths_for(folder_key):
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.name


# ============================================================================================== tensors

def _torch_dtype(name: str):
    import torch  # noqa: PLC0415

    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise FinetuneError(f"unknown dtype '{name}'", input="dtype", fix=f"use one of {', '.join(SAVE_DTYPES)}")
    return table[name]


def _cpu_tensors(sd: Mapping[str, Any], dtype=None, *, clone: bool = False) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (floats cast to ``dtype``); storage shared between keys is copied apart.

    safetensors refuses tensors that share memory; state dicts of live models may (views, tied weights).
    """
    import torch  # noqa: PLC0415

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        t = t.to(device="cpu", dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        if clone or not t.is_contiguous():
            t = t.contiguous() if not clone else t.clone(memory_format=torch.contiguous_format)
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _tensor_data_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the safetensors data section (bytes after the header): A1111's ``sshs_model_hash``.

    The data section does not depend on the metadata, so it is computed from a metadata-free serialisation.
    """
    from safetensors.torch import save  # noqa: PLC0415

    blob = save(dict(sd))
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def _save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    meta = {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=meta))


def _str_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if v is None:
            v = "None"  # kohya's spelling
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, sort_keys=True, default=str)
        out[str(k)] = str(v)
    return out


def _merge_metadata(computed: Mapping[str, str], extra: Mapping[str, Any] | None, protected: set[str]
                    ) -> dict[str, str]:
    """``computed`` plus ``extra`` (stringified); keys describing the file's own structure keep computed values."""
    merged = dict(computed)
    for k, v in _str_metadata(extra).items():
        if k in protected and k in computed:
            continue
        merged[k] = v
    return merged


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ============================================================================================== LoRA

_LORA_PROTECTED = {
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
    "modelspec.prediction_type", "format", "lora_adapter_metadata", *_STALE_KEYS,
}


def save_lora(lora: LoraWeights, path: str | os.PathLike, *, family: Family | str,
              unet_config: Mapping[str, Any], layout: Literal["kohya", "diffusers"] = "kohya",
              metadata: Mapping[str, Any] | None = None, v_prediction: bool | None = None) -> Path:
    """Write ``lora`` as a ``.safetensors`` file at ``path`` (atomically; the caller picked the path).

    Args:
        lora: the LoRA; its ``metadata`` (e.g. training settings) is carried into the file.
        family: the model family the LoRA is for (a LoRA of another family is refused).
        unet_config: the target UNet's config (SDXL kohya names need it).
        layout: ``"kohya"`` (``lora_unet_*``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, ``.alpha``: ComfyUI
            LoraLoader, A1111, kohya, diffusers all read it) or ``"diffusers"`` (PEFT keys with
            ``lora_adapter_metadata``).
        metadata: extra header entries (trainer's ``ss_*`` keys, settings); values are stringified. Keys that
            describe the file itself (``ss_network_dim``, ``modelspec.architecture`` ...) keep computed values.
        v_prediction: picks the model's ModelSpec names and resolution (SD2: ``stable-diffusion-v2-768-v`` at 768x768
            vs ``-512`` at 512x512); None follows the family's usual prediction.
    Returns:
        ``path``. Metadata always has the kohya minimum ``ss_*`` keys, the ModelSpec MUST keys, ``ss_output_name``,
        ``modelspec.date`` and, for kohya, ``sshs_model_hash`` / ``modelspec.hash_sha256``.
    """

    path = Path(path)
    family = Family(family)
    if layout not in LORA_LAYOUTS:
        raise FinetuneError(f"unknown LoRA layout '{layout}'", input="layout",
                            fix=f"use one of {', '.join(LORA_LAYOUTS)}")
    if not lora.modules:
        raise FinetuneError("the LoRA has no modules (nothing was trained or loaded)", input="lora",
                            fix="connect a trained LoRA")
    check_family("LoRA", lora.family, family, input="lora")
    try:
        sd, meta = to_kohya_state_dict(lora, family=family, unet_config=unet_config, v_prediction=v_prediction)
        if layout == "diffusers":
            sd, diff_meta = to_diffusers_state_dict(lora, family=family, unet_config=unet_config)
            meta.update(diff_meta)
    except ValueError as exc:
        fix = "save it in the kohya layout" if layout == "diffusers" else "check that the LoRA fits this model"
        raise FinetuneError(f"cannot write this LoRA: {exc}", input="lora", fix=fix) from exc
    tensors = _cpu_tensors(sd, clone=True)
    meta.update({"modelspec.title": path.stem, "ss_output_name": path.stem, "modelspec.date": _now()})
    meta = _merge_metadata(meta, metadata, _LORA_PROTECTED)
    if layout == "kohya":
        digest = _tensor_data_sha256(tensors)
        meta["sshs_model_hash"] = digest
        meta["modelspec.hash_sha256"] = "0x" + digest
    return _save_safetensors(path, tensors, meta)


# ============================================================================================== embeddings

_EMBEDDING_PROTECTED = {
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
    "num_vectors", *_STALE_KEYS,
}


def _as_2d(t):
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def save_embedding(embedding: Embedding, path: str | os.PathLike, *, family: Family | str,
                   v_prediction: bool | None = None, widths: list[int] | None = None,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a textual-inversion embedding that ComfyUI and A1111 both load.

    SD 1.x / 2.x: ``{"emb_params": [N, width]}``: one tensor, which ComfyUI's ``load_embed`` takes as its
    fallback and A1111 reads (kohya's layout). SDXL: ``{"clip_l": [N, 768], "clip_g": [N, 1280]}`` (A1111,
    ComfyUI, kohya). Vectors keep their dtype. The prompt word is the file name: ``embedding:<name>`` in
    ComfyUI, ``<stem>`` in A1111.

    Args:
        embedding: vectors ``{"te1": [N, w]}`` (+ ``"te2"`` for SDXL); ``metadata`` is carried into the file.
        family: the model family; decides the layout.
        v_prediction: as for :func:`save_lora` (``modelspec.architecture`` and ``modelspec.resolution``).
        widths: the model's text-encoder widths; when given, vectors of another width are refused.
        metadata: extra header entries.
    """
    path = Path(path)
    family = Family(family)
    vectors = dict(embedding.vectors)
    n_enc = 2 if family is Family.SDXL else 1
    want = ("te1", "te2")[:n_enc]
    missing = [c for c in want if c not in vectors]
    extra = [c for c in vectors if c not in want]
    if missing or extra:
        have = ", ".join(sorted(vectors)) or "none"
        raise FinetuneError(f"embedding '{embedding.name}' has vectors for {have}, but a {family.label} embedding "
                            f"needs {' and '.join(want)}", input="embedding",
                            fix="connect the model the embedding was trained on")
    mats = {c: _as_2d(vectors[c]) for c in want}
    counts = {int(m.shape[0]) for m in mats.values()}
    if len(counts) != 1 or 0 in counts:
        raise FinetuneError(f"embedding '{embedding.name}' has different vector counts per text encoder "
                            f"({[int(m.shape[0]) for m in mats.values()]})", input="embedding",
                            fix="retrain the embedding")
    if widths is not None:
        for (comp, m), width in zip(mats.items(), widths):
            if int(m.shape[-1]) != int(width):
                raise FinetuneError(f"embedding '{embedding.name}' has {comp} vectors of size {int(m.shape[-1])}, "
                                    f"but this model's text encoder {comp[-1]} is {int(width)} wide",
                                    input="embedding", fix="connect the model the embedding was trained on")
    if family is Family.SDXL:
        sd = {"clip_l": mats["te1"], "clip_g": mats["te2"]}
    else:
        sd = {"emb_params": mats["te1"]}
    tensors = _cpu_tensors(sd, clone=True)
    stem = path.stem
    computed = {
        **modelspec_keys(family, "textual-inversion", v_prediction),
        "modelspec.title": stem,
        "modelspec.date": _now(),
        "modelspec.trigger_phrase": stem,
        "modelspec.usage_hint": f"ComfyUI: embedding:{stem} in the prompt; A1111: {stem}",
        "name": stem,
        "trigger_word": stem,
        "num_vectors": str(next(iter(counts))),
    }
    base = {k: v for k, v in _str_metadata(embedding.metadata).items() if k not in _STALE_KEYS}
    meta = _merge_metadata({**base, **computed}, metadata, _EMBEDDING_PROTECTED)
    digest = _tensor_data_sha256(tensors)
    meta["modelspec.hash_sha256"] = "0x" + digest
    return _save_safetensors(path, tensors, meta)


# ============================================================================================== checkpoints


def save_embedding_for(embedding: Embedding, handle: ModelHandle, name: str, *, overwrite: bool,
                       node: str | None, input: str = "name") -> tuple[Path, str]:
    """Save ``embedding`` for ``handle``'s model into models/embeddings; returns the path and its prompt word.

    The prompt word is ``embedding:<name>`` with the name as saved (``_2`` appended when the file existed).
    """
    path = target_path("embeddings", name, ".safetensors", overwrite=bool(overwrite), node=node, input=input)
    widths = [int(te.config.hidden_size) for te in handle.base.text_encoders]
    save_embedding(embedding, path, family=handle.family, widths=widths,
                   v_prediction=handle.base.prediction_type == "v_prediction")
    saved = relative_name(path, "embeddings")
    stem = saved[: -len(".safetensors")] if saved.lower().endswith(".safetensors") else saved
    return path, f"embedding:{stem}"


def _checkpoint_metadata(handle: ModelHandle, title: str, dtype: str) -> dict[str, str]:
    base = handle.base
    v = base.prediction_type == "v_prediction"
    meta = {
        **modelspec_keys(base.family, "checkpoint", v),
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.date": _now(),
        "modelspec.description": f"saved by comfyui-finetune from {handle.describe()} ({dtype})",
    }
    if handle.loras:
        meta["modelspec.merged_from"] = ", ".join(
            [base.label or Path(base.source).name] + [p.lora.name for p in handle.loras])
    return meta


def _snapshot(handle: ModelHandle, dtype) -> tuple[dict, dict, list[dict]]:
    """CPU state dicts of UNet, VAE and text encoders with the handle's LoRAs merged, cast to ``dtype``."""
    base = handle.base
    with handle.patched():
        unet = _cpu_tensors(base.unet.state_dict(), dtype)
        vae = _cpu_tensors(base.vae.state_dict(), dtype)
        tes = [_cpu_tensors(te.state_dict(), dtype) for te in base.text_encoders]
    return unet, vae, tes


def save_checkpoint(handle: ModelHandle, path: str | os.PathLike, *,
                    format: Literal["single_file", "diffusers"] = "single_file",
                    dtype: Literal["fp16", "bf16", "fp32"] = "fp16") -> Path:
    """Write the handle's model - base weights with its LoRAs merged in - as a checkpoint.

    ``single_file``: a ``.safetensors`` with LDM/SGM names that ComfyUI's CheckpointLoaderSimple and A1111 load
    (text-encoder keys with ``text_model.``), ModelSpec metadata (architecture, ``implementation`` ``sgm``, title,
    resolution, ``prediction_type`` ``epsilon``/``v``) and, for an SDXL v-prediction model, the empty ``v_pred``
    tensor ComfyUI reads (``ztsnr`` too for zero-terminal-SNR schedules). SD1/SD2 v-prediction is only in the
    metadata (ComfyUI guesses SD2 v from the weights; SD1 v needs its ModelSamplingDiscrete node).
    ``diffusers``: a folder with ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder(_2)/``,
    ``tokenizer(_2)/`` (with ``vocab.json`` + ``merges.txt``) and ``scheduler/scheduler_config.json``, written
    to a temporary folder and renamed into place.
    Embeddings carried by the handle are not part of a checkpoint. Floats are cast to ``dtype``; with the
    model's own dtype every tensor is written bit-exactly.
    """
    path = Path(path)
    if format not in CHECKPOINT_FORMATS:
        raise FinetuneError(f"unknown checkpoint format '{format}'", input="format",
                            fix=f"use one of {', '.join(CHECKPOINT_FORMATS)}")
    torch_dtype = _torch_dtype(dtype)
    base = handle.base
    if base.family is Family.KOLORS and format == "single_file":
        raise FinetuneError("a Kolors model cannot be saved as a single file: ComfyUI's checkpoint loader, A1111 and "
                            "kohya read no Kolors checkpoint", input="format",
                            fix="set format to diffusers: a folder in models/diffusers that diffusers' KolorsPipeline "
                                "and Load Base Model read")
    title = path.stem if format == "single_file" else path.name
    with base.lock:  # nobody patches or trains these weights while we read them
        unet, vae, tes = _snapshot(handle, torch_dtype)
    meta = _checkpoint_metadata(handle, title, dtype)
    if format == "single_file":
        return _save_single_file(handle, path, unet, vae, tes, meta)
    return atomic_write(path, lambda tmp: _write_diffusers_folder(handle, tmp, unet, vae, tes, torch_dtype, meta),
                        folder=True)


def _save_single_file(handle: ModelHandle, path: Path, unet: dict, vae: dict, tes: list[dict],
                      meta: dict[str, str]) -> Path:
    import torch  # noqa: PLC0415

    base = handle.base
    ldm = diffusers_to_ldm(base.family, unet, vae, tes, unet_config=dict(base.unet.config),
                           vae_config=dict(base.vae.config))
    if base.family is Family.SDXL and base.prediction_type == "v_prediction":
        ldm["v_pred"] = torch.tensor([])
        if base.scheduler_config.get("rescale_betas_zero_snr"):
            ldm["ztsnr"] = torch.tensor([])
    return _save_safetensors(path, _cpu_tensors(ldm), meta)


def _write_diffusers_folder(handle: ModelHandle, folder: Path, unet: dict, vae: dict, tes: list[dict],
                            torch_dtype, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    base = handle.base
    sdxl = base.family is Family.SDXL
    for name, model, sd in (("unet", base.unet, unet), ("vae", base.vae, vae)):
        (folder / name).mkdir()
        model.save_config(folder / name)
        save_file(sd, str(folder / name / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if base.family is Family.KOLORS:
        _write_kolors_rest(base, folder, tes[0], torch_dtype, meta)
        return
    te_names = ("text_encoder", "text_encoder_2")
    tok_names = ("tokenizer", "tokenizer_2")
    for i, (te, sd) in enumerate(zip(base.text_encoders, tes)):
        out = folder / te_names[i]
        out.mkdir()
        cfg = copy.deepcopy(te.config)
        cfg.architectures = [type(te).__name__]
        # The saved dtype, so from_pretrained(dtype="auto") loads it as written (transformers 5: `dtype`,
        # 4.x: `torch_dtype`).
        setattr(cfg, "dtype" if "dtype" in cfg.to_dict() or not hasattr(cfg, "torch_dtype") else "torch_dtype",
                torch_dtype)
        cfg.save_pretrained(out)
        # Old-style "text_model." keys: transformers 4.x/5.x and ComfyUI's DiffusersLoader all read them.
        keys = {k: t for k, t in sd.items() if not k.endswith("position_ids")}
        keys = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): t
                for k, t in keys.items()}
        save_file(keys, str(out / "model.safetensors"), metadata={"format": "pt"})
    for i, tok in enumerate(base.tokenizers[: len(base.text_encoders)]):
        _write_tokenizer(folder / tok_names[i], tok)
    scheduler_class = _write_scheduler(base, folder)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if sdxl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = _source_index(base).get("force_zeros_for_empty_prompt", True)
    else:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    index["_comfyui_finetune"] = {k.removeprefix("modelspec."): v for k, v in meta.items()}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_scheduler(base, folder: Path) -> str:
    """``scheduler/scheduler_config.json`` of the model's noise schedule; returns the scheduler's class name."""
    sched = dict(base.scheduler_config)
    sched.setdefault("_class_name", "EulerDiscreteScheduler")
    sched["prediction_type"] = base.prediction_type
    sched["_diffusers_version"] = _diffusers_version()
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True))
    return sched["_class_name"]


def _write_kolors_rest(base, folder: Path, te_sd: dict, torch_dtype, meta: dict[str, str]) -> None:
    """The rest of a Kolors folder as ``KolorsPipeline`` reads it: ChatGLM3 (its own config class and key names, one
    safetensors file), its SentencePiece tokenizer, the scheduler and ``model_index.json``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    te = base.text_encoders[0]
    (folder / "text_encoder").mkdir()
    cfg = copy.deepcopy(te.config)
    cfg.architectures = [type(te).__name__]
    cfg.torch_dtype = str(torch_dtype).removeprefix("torch.")
    cfg.save_pretrained(folder / "text_encoder")
    save_file(te_sd, str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    base.tokenizers[0].save_pretrained(str(folder / "tokenizer"))  # tokenizer.model + tokenizer_config.json
    scheduler_class = _write_scheduler(base, folder)
    index = {"_class_name": "KolorsPipeline", "_diffusers_version": _diffusers_version(),
             "force_zeros_for_empty_prompt": _source_index(base).get("force_zeros_for_empty_prompt", False),
             "scheduler": ["diffusers", scheduler_class], "text_encoder": ["kolors", "ChatGLMModel"],
             "tokenizer": ["kolors", "ChatGLMTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "_comfyui_finetune": {k.removeprefix("modelspec."): v for k, v in meta.items()}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _diffusers_version() -> str:
    try:
        import diffusers  # noqa: PLC0415

        return str(diffusers.__version__)
    except Exception:  # pragma: no cover  # noqa: BLE001
        return "0.0.0"


def _source_index(base) -> dict:
    try:
        return json.loads((Path(base.source) / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}


def _write_tokenizer(folder: Path, tok) -> None:
    """``save_pretrained`` plus ``vocab.json``/``merges.txt`` (transformers 5 writes only ``tokenizer.json``)."""
    tok.save_pretrained(str(folder))
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.exists() and merges_file.exists():
        return
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or merges is None:
        raise RuntimeError(f"cannot write vocab.json/merges.txt: the tokenizer is not a BPE tokenizer ({type(tok)})")
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    special = folder / "special_tokens_map.json"
    if not special.exists():
        tokens = {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                  if getattr(tok, k, None) is not None}
        special.write_text(json.dumps(tokens, indent=1), encoding="utf-8")
