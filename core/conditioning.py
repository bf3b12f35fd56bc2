"""Prompt → conditioning tensors, with ComfyUI's weighting, chunking and embedding rules.

Run inside :meth:`ModelHandle.patched` so LoRAs on the text encoders take effect.
Per encoder: the prompt is cut into 77-token windows (:mod:`.prompt_syntax`), all windows
are encoded in one batch, the conditioning layer is picked per family (SD 1.x / 2.x: last
layer with final layer norm; SDXL: penultimate layer without it), weights are applied as
``z_empty + w * (z - z_empty)`` (ComfyUI's ``ClipTokenWeightEncoder``), and the windows are
concatenated on the token axis. SDXL concatenates CLIP-L and bigG on the channel axis and
takes the pooled output of bigG's first window.

The sampler and the trainers batch conditionings with the same helpers: :func:`same_length` /
:func:`stack_conds` (prompts of different lengths) and :func:`sdxl_added` (SDXL's size conditioning).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import kolors
from .embeddings import Embedding, find_embedding_file, inject, load_embedding_file
from .errors import FinetuneError
from .families import Family
from .prompt_syntax import Token, chunk_count_equalize, tokenize_chunks

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .handle import ModelHandle

log = logging.getLogger("comfy_finetune")


@dataclass(frozen=True)
class Negative:
    """What flows along FT_NEGATIVE links: the text, encoded at sample time by the patched encoders."""

    text: str


@dataclass
class Conditioning:
    cond: torch.Tensor  # [1, 77*k, D]
    pooled: torch.Tensor | None = None  # [1, P] (SDXL)


_NAME_CHAR = re.compile(r'[^\s()<>:"|?*,\x00-\x1f]')  # characters that would run on into an embedding name


def substitute_tokens(text: str, embeddings: dict[str, Embedding]) -> str:
    """Write each embedding's plain ``token`` (e.g. ``<my-dog>``) in ``text`` as ``embedding:<name>``.

    Whole words only (case-insensitive, like CLIP): after the start, whitespace or ``(`` and before the end,
    whitespace, punctuation, ``:`` or ``)``; text already written ``embedding:...`` is never touched. Spaces are
    added where the prompt parser needs them to see the reference (they do not change CLIP tokens).
    """
    words = {e.token.lower(): name for name, e in embeddings.items()
             if getattr(e, "token", None) and ":" not in e.token and not any(c.isspace() for c in e.token)}
    if not words:
        return text
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    pattern = re.compile(rf"(?<![^\s(])(?:{alternatives})(?=$|[\s,.;:!?)\]])", re.IGNORECASE)

    def repl(m: re.Match) -> str:
        before = text[m.start() - 1] if m.start() else " "
        after = text[m.end()] if m.end() < len(text) else " "
        lead = "" if before in " \n" else " "
        trail = " " if _NAME_CHAR.match(after) else ""
        return f"{lead}embedding:{words[m.group().lower()]}{trail}"

    return pattern.sub(repl, text)


class PromptEncoder:
    """Encodes prompts for one (patched) handle; caches embedding files it loaded."""

    def __init__(self, handle: ModelHandle, *, node: str | None = None, input: str = "prompt") -> None:
        self.handle = handle
        self.base = handle.base
        self.node = node
        self.input = input
        self.widths = [int(te.config.hidden_size) for te in self.base.text_encoders]
        self._embeddings: dict[str, Embedding | None] = {}

    # ------------------------------------------------------------------ embeddings
    def embedding(self, name: str) -> Embedding | None:
        if name in self._embeddings:
            return self._embeddings[name]
        emb = self.handle.embeddings.get(name)
        if emb is None:
            path = find_embedding_file(name)
            if path is not None:
                try:
                    emb = load_embedding_file(path, self.widths)
                except FinetuneError as exc:
                    raise FinetuneError(f"embedding:{name}: {exc.detail}", node=self.node, input=self.input,
                                        fix=exc.fix) from exc
        self._embeddings[name] = emb
        return emb

    def _missing(self, name: str) -> None:
        raise FinetuneError(f"embedding:{name} was not found in models/embeddings or among this model's embeddings",
                            node=self.node, input=self.input,
                            fix="check the name (sub-folders allowed, extension optional) or remove it from the "
                                "prompt")

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> list[list[list[Token]]]:
        """Chunks per encoder, equal in count across encoders."""
        text = substitute_tokens(text, self.handle.embeddings)
        per_encoder = []
        for i, tok in enumerate(self.base.tokenizers):
            comp = f"te{i + 1}"
            pad_kind = self.base.info.te_pad_ids[min(i, len(self.base.info.te_pad_ids) - 1)]
            pad = tok.eos_token_id if pad_kind == "eos" else 0

            def size(name: str, comp=comp) -> int | None:
                emb = self.embedding(name)
                if emb is None:
                    return None
                vec = emb.vectors.get(comp)
                return None if vec is None else int(vec.shape[0])

            def tokenize(s: str, tok=tok) -> list[int]:
                return list(tok(s, add_special_tokens=False, truncation=False).input_ids)

            chunks = tokenize_chunks(text, tokenize, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=pad,
                                     embedding_size=size, placeholder=0, on_missing_embedding=self._missing)
            per_encoder.append((chunks, tok.bos_token_id, tok.eos_token_id, pad))
        if len(per_encoder) == 2:
            (a, *sa), (b, *sb) = per_encoder
            a, b = chunk_count_equalize(a, b, bos=sa[0], eos=sa[1], pad=sa[2]) if len(a) < len(b) else (a, b)
            b, a = chunk_count_equalize(b, a, bos=sb[0], eos=sb[1], pad=sb[2]) if len(b) < len(a) else (b, a)
            return [a, b]
        return [per_encoder[0][0]]

    def encode(self, text: str) -> Conditioning:
        import torch  # noqa: PLC0415

        if self.base.family is Family.KOLORS:
            return self._encode_kolors(text)
        chunks_per_encoder = self.tokenize(text)
        conds, pooled = [], None
        for i, chunks in enumerate(chunks_per_encoder):
            hidden, pool = self._encode_chunks(i, chunks)
            conds.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if i == 1:
                pooled = pool[:1]
        cond = torch.cat(conds, dim=-1) if len(conds) > 1 else conds[0]
        return Conditioning(cond=cond, pooled=pooled)

    def _encode_kolors(self, text: str) -> Conditioning:
        """Kolors: one ChatGLM3 prompt of at most 256 tokens, left-padded (:mod:`.kolors`)."""
        te, tok = self.base.text_encoders[0], self.base.tokenizers[0]

        def size(name: str) -> int | None:
            emb = self.embedding(name)
            vec = None if emb is None else emb.vectors.get("te1")
            return None if vec is None else int(vec.shape[0])

        tokens = kolors.tokenize(tok, substitute_tokens(text, self.handle.embeddings), embedding_size=size,
                                 on_missing_embedding=self._missing, node=self.node, input=self.input)
        hidden, pooled = kolors.encode(te, tok, tokens, lambda name, i: self.embedding(name).vectors["te1"][i])
        return Conditioning(cond=hidden, pooled=pooled)

    def _encode_chunks(self, index: int, chunks: list[list[Token]]):
        import torch  # noqa: PLC0415

        te = self.base.text_encoders[index]
        comp = f"te{index + 1}"
        device = next(te.parameters()).device
        ids = torch.tensor([[t.id for t in ch] for ch in chunks], dtype=torch.long, device=device)
        weights = torch.tensor([[t.weight for t in ch] for ch in chunks], dtype=torch.float32, device=device)
        repl = []
        for b, ch in enumerate(chunks):
            for pos, t in enumerate(ch):
                if t.embedding is not None:
                    emb = self.embedding(t.embedding)
                    repl.append((b, pos, emb.vectors[comp][t.vector]))
        hidden, pooled = self._run(te, index, ids, repl)
        if bool((weights != 1.0).any()):
            tok = self.base.tokenizers[index]
            pad = chunks[0][-1].id if chunks[0][-1].id in (0, tok.eos_token_id) else tok.eos_token_id
            empty = torch.full_like(ids[:1], pad)
            empty[0, 0], empty[0, 1] = tok.bos_token_id, tok.eos_token_id
            z_empty, _ = self._run(te, index, empty, [])
            w = weights.to(hidden.dtype).unsqueeze(-1)
            hidden = z_empty + w * (hidden - z_empty)
        return hidden, pooled

    def _run(self, te, index: int, ids, repl):
        layer = self.base.info.te_layers[min(index, len(self.base.info.te_layers) - 1)]
        with inject(te.get_input_embeddings(), repl):
            out = te(input_ids=ids, output_hidden_states=layer != -1)
        if layer == -1:
            hidden = out.last_hidden_state  # includes the final layer norm
        else:
            hidden = out.hidden_states[layer]
            if self.base.info.te_final_norm:  # pragma: no cover - no family uses this combination today
                hidden = te.text_model.final_layer_norm(hidden)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        return hidden, pooled


def encode_prompt(handle: ModelHandle, text: str, **kwargs) -> Conditioning:
    """Encode ``text`` with the handle's (already patched) text encoders."""
    return PromptEncoder(handle, **kwargs).encode(text)


# ---------------------------------------------------------------------------------------------- batching
def same_length(conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[B, L_i, D]`` conditionings of different token lengths (prompts of different chunk counts) repeated along
    the tokens to the least common multiple of the lengths, as ComfyUI's ``CONDCrossAttn.concat`` does."""
    lengths = {int(c.shape[1]) for c in conds}
    if len(lengths) <= 1:
        return list(conds)
    lcm = math.lcm(*lengths)
    return [c.repeat(1, lcm // c.shape[1], 1) for c in conds]


def stack_conds(conds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``[1, L_i, D]`` conditionings of different token lengths into one batch (:func:`same_length`)."""
    import torch  # noqa: PLC0415

    return torch.cat(same_length(conds))


def sdxl_added(pooled: torch.Tensor, height: int, width: int, dtype, device) -> dict:
    """SDXL's and Kolors' extra conditioning (the UNet's ``added_cond_kwargs``) for a batch: the pooled text
    embedding (SDXL bigG ``[B, 1280]``, Kolors ChatGLM3 ``[B, 4096]``) and per row the time ids ``(original height,
    width, crop top, left, target height, width)``, here the image size, no crop and the image size again."""
    import torch  # noqa: PLC0415

    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(pooled.shape[0], 1)
    return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids}
