"""ComfyUI prompt syntax (weights, escapes, ``embedding:``) and CLIP chunking, in plain Python.

Mirrors ``comfy/sd1_clip.py`` (``token_weights``, ``parse_parentheses``,
``escape_important`` and ``SDTokenizer.tokenize_with_weights``) so prompts typed by
ComfyUI users give the same weights and chunks in this pack. Stdlib only; the caller
supplies the real tokenizer and the embedding lookup.

Weight syntax (ComfyUI facts):

* ``(text)`` multiplies the weight by 1.1; nesting multiplies (``weight * 1.1`` per level,
  so ``((x))`` is ``1.0 * 1.1 * 1.1``, bit-identical to ComfyUI).
* ``(text:1.3)`` *sets* the weight to 1.3, replacing the enclosing weight. The number after
  the LAST colon of the group is used if it is past the first character and parses with
  ``float`` (``str.rfind(":")``, ``xx > 0``); otherwise the colon stays plain text and the
  group keeps its 1.1 multiplier.
* ``\\(`` and ``\\)`` are literal parentheses (the backslash is removed). ``[text]`` is plain
  text: brackets are kept, no de-emphasis.

Choices where ComfyUI is quirky or undefined (documented, deliberate):

* Parentheses are matched like brackets in code: a ``)`` with no open group and a ``(`` never
  closed are literal text; the rest of the prompt is parsed normally. (ComfyUI's depth
  counter can turn ``(a (b`` into one 1.1 group or ``a) (b)`` into plain text.)
* A weight must be finite: ``(x:nan)`` / ``(x:inf)`` are plain text with the 1.1 multiplier.
* Adjacent segments are never merged: ComfyUI tokenizes each group's text on its own, so
  ``a(b)`` is two words ``a``, ``b`` (merging ``a(b:1.0)`` into ``ab`` would change tokens).

``embedding:<name>`` (ComfyUI splits each weighted segment at ``" embedding:"`` /
``"\\nembedding:"``): recognised at the start of a segment or after a space or newline;
elsewhere (``a,embedding:x``) it is plain text. The name runs until whitespace, a character
that is invalid in Windows file names (``<>:"|?*``), a parenthesis or a comma; what follows
(e.g. a trailing comma) stays as plain text, like ComfyUI's "leftover". ``/`` and ``\\`` are
allowed (subfolders); the extension may be omitted. An empty name leaves ``embedding:`` as
text. The name is passed verbatim to the caller, whose resolver must confine it to the
embeddings folder (ComfyUI checks ``os.path.commonpath``).

Chunking (``tokenize_with_weights``): each whitespace-separated word is tokenized on its own
and forms a group; an embedding is one group of N pseudo-tokens. A chunk is BOS + up to
``chunk_length - 2`` content tokens + EOS + pads. A group shorter than ``max_word_length``
that does not fit closes the chunk (EOS, pads) and starts the next one; longer groups are
split at the boundary. BOS/EOS/pad tokens have weight 1.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Segment", "Token", "parse_weights", "tokenize_chunks", "chunk_count_equalize"]

EMBEDDING_IDENTIFIER = "embedding:"
# `embedding:` at the start of a text segment or right after a space / newline.
_EMBEDDING_RE = re.compile(r"(?<![^ \n])embedding:")
# Name characters: no whitespace, parens, comma, Windows-invalid chars or control chars.
_NAME_RE = re.compile(r'[^\s()<>:"|?*,\x00-\x1f]+')


@dataclass(frozen=True)
class Segment:
    """A run of text with one weight, or an embedding reference."""

    text: str
    weight: float
    embedding: str | None = None  # embedding name when this segment is `embedding:<name>` (text == name then)


@dataclass(frozen=True)
class Token:
    """One position of a chunk: a token id with its weight (or an embedding vector)."""

    id: int  # token id (for embedding pseudo-tokens: the placeholder id passed by the caller)
    weight: float
    embedding: str | None = None  # embedding name for pseudo-tokens
    vector: int = 0  # index of the embedding vector for pseudo-tokens


def _split_embeddings(text: str, weight: float, out: list[Segment]) -> None:
    """Append ``text`` to ``out``, cutting out ``embedding:<name>`` references."""
    start = 0
    for m in _EMBEDDING_RE.finditer(text):
        name_m = _NAME_RE.match(text, m.end())
        if name_m is None:  # `embedding:` followed by nothing usable: plain text
            continue
        if m.start() > start:
            out.append(Segment(text[start : m.start()], weight))
        out.append(Segment(name_m.group(), weight, embedding=name_m.group()))
        start = name_m.end()
    if start < len(text):
        out.append(Segment(text[start:], weight))


def _group_weight(s: str, open_i: int, close_i: int, outer: float) -> tuple[float, int]:
    """Weight of the group ``s[open_i] .. s[close_i]`` and where its text ends.

    ComfyUI: ``weight *= 1.1``; then if the last ``:`` of the inner text is past its first
    character and the rest parses as a float, that float replaces the weight.
    """
    weight = outer * 1.1
    colon = s.rfind(":", open_i + 1, close_i)
    if colon > open_i + 1:
        try:
            value = float(s[colon + 1 : close_i])
        except ValueError:
            return weight, close_i
        if math.isfinite(value):
            return value, colon
    return weight, close_i


def parse_weights(prompt: str) -> list[Segment]:
    """Split a prompt into weighted text segments and embedding references (ComfyUI semantics).

    Adjacent segments with equal weight may be merged (this implementation never merges: one
    segment per run of text between parentheses, as ComfyUI tokenizes them). Empty runs are
    dropped. Never raises on any str; iterative, so arbitrarily deep nesting is fine.
    """
    # Lex: escaped parens become literal characters; bare parens are structural.
    chars: list[str] = []
    structural: list[bool] = []
    i, n = 0, len(prompt)
    while i < n:
        c = prompt[i]
        if c == "\\" and i + 1 < n and prompt[i + 1] in "()":
            chars.append(prompt[i + 1])
            structural.append(False)
            i += 2
            continue
        chars.append(c)
        structural.append(c in "()")
        i += 1

    # Match parentheses; unmatched ones become literal text.
    match: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(chars):
        if not structural[i]:
            continue
        if c == "(":
            stack.append(i)
        elif stack:
            match[stack.pop()] = i
        else:
            structural[i] = False
    for i in stack:
        structural[i] = False

    s = "".join(chars)  # same length as chars; used for rfind / float parsing
    out: list[Segment] = []
    buf: list[str] = []
    # Stack of (weight, index where the group's text stops: its close paren or weight colon).
    groups: list[tuple[float, int]] = [(1.0, len(chars))]
    i = 0
    while i < len(chars):
        weight, text_end = groups[-1]
        if structural[i]:
            if buf:
                _split_embeddings("".join(buf), weight, out)
                buf = []
            if chars[i] == "(":
                groups.append(_group_weight(s, i, match[i], weight))
            else:
                groups.pop()
        elif i < text_end:
            buf.append(chars[i])
        else:  # the `:1.3` suffix of a weighted group: skip to the close paren
            i = next(j for j in range(i, len(chars)) if structural[j])
            continue
        i += 1
    if buf:
        _split_embeddings("".join(buf), groups[-1][0], out)
    return out


def _empty_chunk(bos: int, eos: int, pad: int, chunk_length: int) -> list[Token]:
    return [Token(bos, 1.0), Token(eos, 1.0)] + [Token(pad, 1.0)] * (chunk_length - 2)


def tokenize_chunks(
    prompt: str,
    tokenize: Callable[[str], list[int]],
    *,
    bos: int,
    eos: int,
    pad: int,
    embedding_size: Callable[[str], int | None] = lambda name: None,
    placeholder: int | None = None,
    chunk_length: int = 77,
    max_word_length: int = 8,
    on_missing_embedding: Callable[[str], None] | None = None,
) -> list[list[Token]]:
    """`tokenize(text)` returns ids WITHOUT bos/eos for a piece of text. `embedding_size(name)`
    returns the number of vectors of a known embedding or None if unknown; unknown embeddings
    are dropped (call on_missing_embedding(name) if given, like ComfyUI's warning). Pseudo-tokens
    of embeddings use id `placeholder` (default: pad). Returns chunks, each exactly chunk_length
    Tokens.

    Groups that do not fit and are shorter than ``max_word_length`` move whole to the next
    chunk, unless the chunk is empty (only possible when ``chunk_length`` is tiny): then they
    are split rather than looping forever. Raises ValueError if ``chunk_length < 3``.
    """
    if chunk_length < 3:
        raise ValueError(f"chunk_length must be >= 3 (BOS, a token, EOS), got {chunk_length}")
    if placeholder is None:
        placeholder = pad

    groups: list[list[Token]] = []
    for seg in parse_weights(prompt):
        if seg.embedding is not None:
            size = embedding_size(seg.embedding)
            if size is None:
                if on_missing_embedding is not None:
                    on_missing_embedding(seg.embedding)
                continue
            groups.append([Token(placeholder, seg.weight, seg.embedding, k) for k in range(size)])
        else:
            # One group per run of text with one weight (ComfyUI's tokenize_with_weights tokenizes each
            # weighted segment whole, cut only at `embedding:`).
            ids = tokenize(seg.text)
            if ids:
                groups.append([Token(t, seg.weight) for t in ids])

    capacity = chunk_length - 2  # content tokens between BOS and EOS
    chunks: list[list[Token]] = []
    chunk: list[Token] = []

    def close() -> None:
        nonlocal chunk
        padding = [Token(pad, 1.0)] * (capacity - len(chunk))
        chunks.append([Token(bos, 1.0), *chunk, Token(eos, 1.0), *padding])
        chunk = []

    for group in groups:
        is_large = len(group) >= max_word_length
        while group:
            room = capacity - len(chunk)
            if len(group) <= room:
                chunk.extend(group)
                break
            if is_large or not chunk:  # split at the chunk boundary
                chunk.extend(group[:room])
                group = group[room:]
            close()
    close()
    return chunks


def chunk_count_equalize(
    a: list[list[Token]], b: list[list[Token]], *, bos: int, eos: int, pad: int
) -> tuple[list[list[Token]], list[list[Token]]]:
    """Pad the shorter list with empty chunks (BOS, EOS, pads) so both have the same number of
    chunks (needed for CFG with prompts of different length).

    The empty chunks take the length of the shorter list's own chunks (of the other list's if
    it has none; 77 if both are empty). Inputs are not modified; new lists are returned.
    """
    a, b = list(a), list(b)
    short = a if len(a) < len(b) else b
    if len(a) != len(b):
        ref = short[0] if short else (a or b)[0]
        empty = _empty_chunk(bos, eos, pad, len(ref))
        short.extend(list(empty) for _ in range(abs(len(a) - len(b))))
    return a, b
