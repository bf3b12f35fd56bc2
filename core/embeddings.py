"""Textual-inversion embeddings: reading every common file layout, and injecting vectors.

An :class:`Embedding` holds one ``[N, width]`` tensor per text encoder (``te1``; ``te2`` for
SDXL's bigG). Prompts name them ``embedding:<name>`` (ComfyUI syntax). The vectors never
enter the tokenizer or the embedding table: pseudo-tokens are encoded with a placeholder id
and a forward hook on the encoder's token-embedding layer swaps in the vectors, so the base
model and its tokenizer stay untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import host
from .errors import FinetuneError
from .safeio import FLOAT_DTYPES, SAFETENSORS_SUFFIXES, TensorSpec, load_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin", ".pth", ".ckpt")


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: dict  # "te1" -> Tensor[N, 768/1024/...], "te2" -> Tensor[N, 1280]
    metadata: dict = field(default_factory=dict)
    # Optional plain prompt word (e.g. "<my-dog>") that stands for ``embedding:<name>`` in prompts of a handle
    # carrying this embedding (set by the textual-inversion trainer).
    token: str | None = None

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def _as_2d(t):
    return t.unsqueeze(0) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def embedding_from_state_dict(name: str, sd: dict, widths: list[int], metadata: dict | None = None) -> Embedding:
    """Pick the vectors for each encoder width from any known layout (A1111 ``emb_params`` /
    ``string_to_param``, SDXL ``clip_l`` + ``clip_g``, diffusers ``<token>`` keys)."""
    import torch  # noqa: PLC0415

    if "string_to_param" in sd and isinstance(sd["string_to_param"], dict):  # A1111 .pt
        sd = {"emb_params": next(iter(sd["string_to_param"].values()))}
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FinetuneError(f"embedding '{name}' holds no tensors", input="embedding",
                            fix="check that the file is a textual-inversion embedding")
    vectors: dict[str, torch.Tensor] = {}
    keyed = {"clip_l": "te1", "clip_h": "te1", "clip_g": "te2"}
    for key, comp in keyed.items():
        if key in tensors:
            vectors.setdefault(comp, _as_2d(tensors[key]).float())
    if not vectors:
        first = _as_2d(next(iter(tensors.values()))).float()
        vectors["te1"] = first
    # SDXL: a 1-encoder embedding made for SD 1.x (768 wide) works on CLIP-L only, as in ComfyUI.
    for comp, width in zip(("te1", "te2"), widths):
        vec = vectors.get(comp)
        if vec is not None and vec.shape[-1] != width:
            got = vec.shape[-1]
            raise FinetuneError(
                f"embedding '{name}' has vectors of size {got}, but this model's text encoder "
                f"{comp[-1]} expects {width} (it was made for another model family)",
                input="embedding", fix="use an embedding trained for this model family")
    return Embedding(name=name, vectors=vectors, metadata=dict(metadata or {}))


def load_embedding_file(path: str | Path, widths: list[int]) -> Embedding:
    """Read an embedding file through :mod:`.safeio`. For safetensors the vector widths and dtypes are checked
    against ``widths`` from the header, before any tensor is read; pickles are loaded weights-only."""

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"embedding file not found: {path}", input="prompt",
                            fix="put the file in models/embeddings")

    def expected(header):  # the same choice of tensors as embedding_from_state_dict, from names alone
        names = list(header.tensors)
        picked: dict[int, str] = {}
        for key, i in (("clip_l", 0), ("clip_h", 0), ("clip_g", 1)):
            if key in names:
                picked.setdefault(i, key)
        if not picked and names:
            picked[0] = names[0]  # tensors come back ordered by name; the first one is used
        return {key: TensorSpec((..., widths[i]) if i < len(widths) else None, FLOAT_DTYPES,
                                f"text encoder {i + 1}'s token width")
                for i, key in picked.items()}

    is_safe = path.suffix.lower() in SAFETENSORS_SUFFIXES
    sd, metadata = load_weights(path, input="prompt", expected=expected if is_safe else None)
    if not sd and not is_safe:
        raise FinetuneError(f"'{path.name}' holds no tensors", input="prompt")
    return embedding_from_state_dict(path.stem, sd, widths, metadata)


def find_embedding_file(name: str) -> Path | None:
    """``embedding:name`` → a file under models/embeddings (sub-folders searched, extension optional)."""

    name = name.strip().rstrip(",")
    candidates = [name] + [name + ext for ext in EMBEDDING_EXTENSIONS]
    for cand in candidates:
        path = host.resolve_model("embeddings", cand)
        if path is not None and path.is_file():
            return path
    stem = Path(name).name
    for rel in host.list_files("embeddings", EMBEDDING_EXTENSIONS):
        if Path(rel).stem == stem or Path(rel).name == stem:
            return host.resolve_model("embeddings", rel)
    return None


@contextmanager
def inject(token_embedding: torch.nn.Module, replacements: list[tuple[int, int, torch.Tensor]]) -> Iterator[None]:
    """Within the block, the output of ``token_embedding`` at (batch, position) is replaced by a vector.

    Gradients flow into the vectors (textual-inversion training uses the same path).
    """
    if not replacements:
        yield
        return

    def hook(module, inputs, output):
        output = output.clone()
        for b, pos, vec in replacements:
            output[b, pos] = vec.to(device=output.device, dtype=output.dtype)
        return output

    handle = token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------- bundled in a LoRA
#: Embeddings bundled in a LoRA file, as kohya writes and A1111 reads them: ``bundle_emb.<name>.string_to_param.*``
#: (one text encoder: SD 1.x / 2.x) or ``bundle_emb.<name>.clip_l`` and ``.clip_g`` (SDXL). A1111 loads each as
#: the embedding ``<name>`` (its prompt word) while the LoRA is active; ComfyUI's embedding loader reads the same
#: keys from a LoRA file placed among its embeddings.
BUNDLE_PREFIX = "bundle_emb."
_BUNDLE_SD1 = ".string_to_param.*"
_BUNDLE_KEYS = {"te1": "clip_l", "te2": "clip_g"}


def split_bundled(state: dict) -> tuple[dict, dict[str, dict]]:
    """``(state without bundled embeddings, {name: {key: tensor}})`` for a LoRA state dict."""
    rest, groups = {}, {}
    for key, value in state.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = value
            continue
        body = key[len(BUNDLE_PREFIX):]
        if body.endswith(_BUNDLE_SD1):
            name, sub = body[: -len(_BUNDLE_SD1)], "emb_params"
        else:
            name, _, sub = body.rpartition(".")
        groups.setdefault(name or body, {})[sub or "emb_params"] = value
    return rest, groups


def bundled_embeddings(groups: dict[str, dict], widths: list[int], metadata: dict | None = None, *,
                       input: str = "lora_name") -> dict[str, Embedding]:
    """The :class:`Embedding` s of :func:`split_bundled`'s groups for a model with text-encoder ``widths``. Each
    one's prompt word is its name, as in A1111 (or the trained token, when the file's metadata names it)."""
    metadata = dict(metadata or {})
    out = {}
    for name, sd in groups.items():
        try:
            emb = embedding_from_state_dict(name, sd, widths)
        except FinetuneError as exc:
            raise FinetuneError(f"the LoRA bundles the embedding '{name}': {exc.detail}", input=input,
                                fix="use the LoRA with the model family it was trained for") from None
        if len(emb.vectors) != len(widths):
            raise FinetuneError(f"the LoRA bundles the embedding '{name}' for {len(emb.vectors)} text encoder(s), "
                                f"this model has {len(widths)}", input=input,
                                fix="use the LoRA with the model family it was trained for")
        token = metadata.get("ft_pivotal_token") if metadata.get("ft_pivotal_embedding") == name else None
        out[name] = Embedding(name, emb.vectors, {}, token=token or name)
    return out


def bundle_state(embeddings: dict[str, Embedding]) -> dict:
    """The ``bundle_emb.*`` tensors for ``embeddings`` (the inverse of :func:`split_bundled`)."""
    out = {}
    for name, emb in embeddings.items():
        if set(emb.vectors) == {"te1"}:
            out[f"{BUNDLE_PREFIX}{name}{_BUNDLE_SD1}"] = emb.vectors["te1"].detach().contiguous()
            continue
        for comp, vec in emb.vectors.items():
            out[f"{BUNDLE_PREFIX}{name}.{_BUNDLE_KEYS[comp]}"] = vec.detach().contiguous()
    return out
