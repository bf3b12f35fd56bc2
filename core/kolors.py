"""Kolors: its ChatGLM3 text encoder and tokenizer, and how a prompt becomes Kolors conditioning.

Facts this relies on (diffusers' ``KolorsPipeline.encode_prompt`` and its ``ChatGLMTokenizer``):

- the tokenizer is SentencePiece (``tokenizer/tokenizer.model``; the ``sentencepiece`` package) with ChatGLM's
  special tokens numbered after the SentencePiece vocabulary; a prompt is ``[gMASK] sop`` + its tokens, padded on
  the *left* with the pad id (0) to 256 positions, with an attention mask (0 on the padding) and position ids
  ``0, 1, ...`` from the first real token (0 on the padding); a prompt longer than 256 tokens is cut there by the
  pipeline (this module refuses it instead);
- the encoder returns hidden states sequence-first (``[L, B, D]``); the conditioning is the second-to-last hidden
  state (``[B, 256, 4096]`` after a transpose), the pooled embedding the last one at the last position (with left
  padding, the last real token);
- the UNet projects the 4096-wide states to its 2048-wide cross-attention (``encoder_hid_proj``, a Linear with
  bias) itself, and takes the pooled embedding and SDXL's six size/crop time ids as added conditioning.

Weights (``(word:1.2)``) follow ComfyUI's rule for CLIP: ``z_empty + w * (z - z_empty)`` per position, where
``z_empty`` is the encoding of the empty prompt. The prompt is tokenized as a whole (so an unweighted prompt gives
exactly the pipeline's tokens, also for Chinese text without spaces) and each token takes the weight of the text
its first character came from (SentencePiece reports every piece's offsets in the input).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .embeddings import inject
from .errors import FinetuneError
from .prompt_syntax import Token, parse_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

MAX_TOKENS = 256  # the pipeline's max_sequence_length, the two prefix tokens included
PREFIX_TOKENS = 2  # [gMASK], sop


def is_chatglm_folder(folder: str | os.PathLike) -> bool:
    """A text-encoder folder whose config.json says ChatGLM (``model_type: chatglm``)."""
    import json  # noqa: PLC0415

    cfg = Path(folder) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == "chatglm"
    except (OSError, ValueError, AttributeError):
        return False


def _require_sentencepiece(node: str | None, input: str) -> None:
    try:
        import sentencepiece  # noqa: F401, PLC0415
    except ImportError as exc:
        raise FinetuneError("Kolors' ChatGLM tokenizer needs the 'sentencepiece' package, which is not installed",
                            node=node, input=input,
                            fix="install it into the python that runs ComfyUI: pip install sentencepiece") from exc


def load_chatglm_tokenizer(folder: str | os.PathLike, *, node: str | None = None, input: str = "ckpt_name"):
    """diffusers' ``ChatGLMTokenizer`` from ``folder/tokenizer.model`` (left padding, as Kolors is run)."""
    folder = Path(folder)
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise FinetuneError(f"Kolors' ChatGLM tokenizer was not found: looked for '{model}'", node=node, input=input,
                            fix="put the model's tokenizer/ folder (tokenizer.model and tokenizer_config.json) "
                                "next to its unet/ and text_encoder/ folders")
    _require_sentencepiece(node, input)
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer  # noqa: PLC0415

    tok = ChatGLMTokenizer.from_pretrained(folder, local_files_only=True)
    tok.padding_side = "left"
    return tok


def load_chatglm(folder: str | os.PathLike):
    """diffusers' ``ChatGLMModel`` from a folder (config.json + safetensors, single or sharded with an index;
    ``.bin`` shards load weights-only)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel  # noqa: PLC0415

    return ChatGLMModel.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class KolorsTokens:
    """One prompt's tokens (prefix included, no padding) with their weights and embedding pseudo-tokens."""

    tokens: tuple[Token, ...]

    @property
    def weighted(self) -> bool:
        return any(t.weight != 1.0 for t in self.tokens)


def _run_tokens(tok, text: str, spans: list[tuple[int, int, float]]) -> list[Token]:
    """Tokenize ``text`` as a whole; each token takes the weight of the span its first character is in."""
    sp = tok.tokenizer.sp_model
    data = text.encode("utf-8")
    byte_weight = [1.0] * (len(data) + 1)
    for start, end, weight in spans:
        b0 = len(text[:start].encode("utf-8"))
        b1 = b0 + len(text[start:end].encode("utf-8"))
        byte_weight[b0:b1] = [weight] * (b1 - b0)
    out = []
    for piece_id, begin in _pieces(sp.encode(text, out_type="serialized_proto")):
        out.append(Token(piece_id, byte_weight[min(begin, len(data))]))
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:  # pragma: no cover - SentencePieceText uses no other wire types
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield number, value


def _pieces(serialized: bytes) -> list[tuple[int, int]]:
    """(id, byte offset of its first input character) per piece of a serialized ``SentencePieceText`` (field 2:
    pieces, each with id = field 2 and begin = field 4, offsets into the input before normalization). Read by hand:
    the ``proto`` return types need the protobuf package, which the ``serialized_proto`` bytes do not."""
    out = []
    for number, value in _fields(serialized):
        if number == 2:
            piece = dict(_fields(value))
            out.append((int(piece.get(2, 0)), int(piece.get(4, 0))))
    return out


def tokenize(tok, text: str, *, embedding_size=None, on_missing_embedding=None, node: str | None = None,
             input: str = "prompt") -> KolorsTokens:
    """``text`` (ComfyUI prompt syntax) as Kolors tokens. ``embedding_size(name)`` gives the vector count of a
    textual-inversion embedding (None: unknown, then ``on_missing_embedding(name)`` is called)."""
    tokens: list[Token] = [Token(int(i), 1.0) for i in tok.get_prefix_tokens()]
    run_text, spans = "", []

    def flush() -> None:
        nonlocal run_text, spans
        if run_text:
            tokens.extend(_run_tokens(tok, run_text, spans))
        run_text, spans = "", []

    for seg in parse_weights(text):
        if seg.embedding is not None:
            flush()
            n = embedding_size(seg.embedding) if embedding_size is not None else None
            if n is None:
                if on_missing_embedding is not None:
                    on_missing_embedding(seg.embedding)
                raise FinetuneError(f"embedding:{seg.embedding} was not found", node=node, input=input,
                                    fix="check the name or remove it from the prompt")
            tokens.extend(Token(int(tok.pad_token_id), seg.weight, seg.embedding, v) for v in range(n))
            continue
        spans.append((len(run_text), len(run_text) + len(seg.text), seg.weight))
        run_text += seg.text
    flush()
    if len(tokens) > MAX_TOKENS:
        raise FinetuneError(f"the prompt is {len(tokens) - PREFIX_TOKENS} tokens long; Kolors reads at most "
                            f"{MAX_TOKENS - PREFIX_TOKENS} (its text encoder was trained on {MAX_TOKENS} positions "
                            f"with {PREFIX_TOKENS} prefix tokens)", node=node, input=input,
                            fix="shorten the prompt (a Chinese character is often one token, an English word one "
                                "or two)")
    return KolorsTokens(tuple(tokens))


def padded_inputs(tok, rows: list[list[int]], device) -> dict:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for token rows, left-padded to 256 as the
    tokenizer's ``_pad`` does."""
    import torch  # noqa: PLC0415

    ids, mask, positions = [], [], []
    for row in rows:
        pad = MAX_TOKENS - len(row)
        ids.append([int(tok.pad_token_id)] * pad + list(row))
        mask.append([0] * pad + [1] * len(row))
        positions.append([0] * pad + list(range(len(row))))
    return {k: torch.tensor(v, dtype=torch.long, device=device)
            for k, v in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions))}


def run_encoder(te, tok, rows: list[list[int]], replacements=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditioning ``[B, 256, D]``, pooled ``[B, D]``) of left-padded token rows; ``replacements``
    ``(row, position in the row, vector)`` swap in embedding vectors."""
    device = next(te.parameters()).device
    inputs = padded_inputs(tok, rows, device)
    shifted = [(b, MAX_TOKENS - len(rows[b]) + pos, vec) for b, pos, vec in replacements]
    with inject(te.get_input_embeddings(), shifted):
        out = te(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-2].permute(1, 0, 2)
    pooled = out.hidden_states[-1][-1]
    return hidden, pooled


def encode(te, tok, tokens: KolorsTokens, vectors=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's (conditioning ``[1, 256, D]``, pooled ``[1, D]``), weights applied; ``vectors(name, i)`` gives
    an embedding pseudo-token's vector."""
    import torch  # noqa: PLC0415

    row = [t.id for t in tokens.tokens]
    repl = [(0, pos, vectors(t.embedding, t.vector)) for pos, t in enumerate(tokens.tokens) if t.embedding]
    hidden, pooled = run_encoder(te, tok, [row], repl)
    if tokens.weighted:
        empty, _ = run_encoder(te, tok, [[int(i) for i in tok.get_prefix_tokens()]])
        w = torch.ones(MAX_TOKENS, dtype=hidden.dtype, device=hidden.device)
        w[MAX_TOKENS - len(row):] = torch.tensor([t.weight for t in tokens.tokens], dtype=hidden.dtype)
        mixed = empty + w[None, :, None] * (hidden - empty)
        hidden = torch.where((w != 1.0)[None, :, None], mixed, hidden)  # weight 1: exactly the unweighted state
    return hidden, pooled
