"""Tests for core/prompt_syntax.py: ComfyUI weight syntax, embeddings and CLIP chunking."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_finetune.core.prompt_syntax import (
    Segment,
    Token,
    chunk_count_equalize,
    parse_weights,
    tokenize_chunks,
)

BOS, EOS = 10**7, 10**7 + 1  # above any ord(), so char_tok never yields them
SD1 = dict(bos=BOS, eos=EOS, pad=EOS)  # SD1 pads with the EOS id
SD2 = dict(bos=BOS, eos=EOS, pad=0)  # SD2 / SDXL-G pad with 0


def char_tok(text: str) -> list[int]:
    """Fake tokenizer: one id per non-space character (CLIP's tokenizer drops whitespace too)."""
    return [ord(c) for c in text if not c.isspace()]


def pairs(prompt: str) -> list[tuple[str, float]]:
    return [(s.text, s.weight) for s in parse_weights(prompt)]


def content(chunk: list[Token]) -> list[Token]:
    """Tokens between BOS and EOS."""
    return chunk[1 : [t.id for t in chunk].index(EOS, 1)]


# --------------------------------------------------------------------------- weights


def test_plain_text_weight_one() -> None:
    assert parse_weights("a cat") == [Segment("a cat", 1.0)]


def test_nesting_multiplies_like_comfyui() -> None:
    assert pairs("(x)") == [("x", 1.1)]
    assert pairs("((x))") == [("x", 1.1**2)]
    assert pairs("(((x)))") == [("x", 1.1**3)]
    w = 1.0
    for depth in range(1, 12):
        w *= 1.1  # ComfyUI: weight *= 1.1 per level (bit-identical)
        [(text, weight)] = pairs("(" * depth + "x" + ")" * depth)
        assert text == "x" and weight == w and math.isclose(weight, 1.1**depth)


def test_explicit_weight_sets_not_multiplies() -> None:
    assert pairs("(cat:1.3)") == [("cat", 1.3)]
    assert pairs("(big (cat:1.5))") == [("big ", 1.1), ("cat", 1.5)]
    assert pairs("((cat:0.5))") == [("cat", 0.5)]
    assert pairs("(a (b) c:2)") == [("a ", 2.0), ("b", 2.2), (" c", 2.0)]


def test_last_colon_wins_and_bad_number_is_text() -> None:
    assert pairs("(a:b:1.3)") == [("a:b", 1.3)]
    assert pairs("(a:b)") == [("a:b", 1.1)]
    assert pairs("(a:1.2:b)") == [("a:1.2:b", 1.1)]
    assert pairs("(cat: 0.7 )") == [("cat", 0.7)]  # float() accepts surrounding spaces
    assert pairs("(:1.5)") == [(":1.5", 1.1)]  # colon at index 0 is not a weight (xx > 0)
    assert pairs("(x:nan)") == [("x:nan", 1.1)]  # non-finite weights rejected (our choice)
    assert pairs("(a (b:1.2))") == [("a ", 1.1), ("b", 1.2)]


def test_escaped_parens_are_literal() -> None:
    assert pairs(r"\(x\)") == [("(x)", 1.0)]
    assert pairs(r"(a \(b\):1.2)") == [("a (b)", 1.2)]
    assert pairs(r"(x\):1.2)") == [("x)", 1.2)]
    assert pairs(r"(x:1.2\))") == [("x:1.2)", 1.1)]  # escaped paren breaks the number
    assert pairs("a\\b") == [("a\\b", 1.0)]  # other backslashes stay


def test_brackets_are_plain_text() -> None:
    assert pairs("[cat] (dog)") == [("[cat] ", 1.0), ("dog", 1.1)]
    assert pairs("[[x]]") == [("[[x]]", 1.0)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a) b", [("a) b", 1.0)]),
        ("(a b", [("(a b", 1.0)]),
        ("(a (b", [("(a (b", 1.0)]),
        ("a) (b)", [("a) ", 1.0), ("b", 1.1)]),
        ("((a)", [("(", 1.0), ("a", 1.1)]),
        ("(a))", [("a", 1.1), (")", 1.0)]),
        (")(", [(")(", 1.0)]),
    ],
)
def test_unbalanced_parens_are_literal(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert pairs(prompt) == expected


def test_empty_groups_and_prompt() -> None:
    assert parse_weights("") == []
    assert pairs("a () b") == [("a ", 1.0), (" b", 1.0)]


def test_deep_nesting_does_not_recurse() -> None:
    segs = parse_weights("(" * 5000 + "x:1.5" + ")" * 5000)
    assert [(s.text, s.weight) for s in segs] == [("x", 1.5)]


# --------------------------------------------------------------------------- embeddings


def emb(prompt: str) -> list[tuple[str, float, str | None]]:
    return [(s.text, s.weight, s.embedding) for s in parse_weights(prompt)]


def test_embedding_at_start_and_after_space_or_newline() -> None:
    assert emb("embedding:foo") == [("foo", 1.0, "foo")]
    assert emb("a embedding:foo b") == [("a ", 1.0, None), ("foo", 1.0, "foo"), (" b", 1.0, None)]
    assert emb("a\nembedding:foo") == [("a\n", 1.0, None), ("foo", 1.0, "foo")]


def test_embedding_not_after_space_is_text() -> None:
    assert emb("a,embedding:foo") == [("a,embedding:foo", 1.0, None)]
    assert emb("xembedding:foo") == [("xembedding:foo", 1.0, None)]
    assert emb("embedding: foo") == [("embedding: foo", 1.0, None)]  # empty name
    assert emb("Embedding:foo") == [("Embedding:foo", 1.0, None)]  # case-sensitive like ComfyUI


def test_embedding_inside_weight_group() -> None:
    assert emb("(embedding:foo:1.2)") == [("foo", 1.2, "foo")]
    assert emb("(embedding:foo)") == [("foo", 1.1, "foo")]
    assert emb("a (b embedding:foo:0.8) c") == [
        ("a ", 1.0, None),
        ("b ", 0.8, None),
        ("foo", 0.8, "foo"),
        (" c", 1.0, None),
    ]


def test_embedding_subfolder_extension_and_trailing_comma() -> None:
    assert emb("embedding:sub/dir/name") == [("sub/dir/name", 1.0, "sub/dir/name")]
    assert emb("embedding:name.safetensors") == [("name.safetensors", 1.0, "name.safetensors")]
    assert emb("embedding:foo, cat") == [("foo", 1.0, "foo"), (", cat", 1.0, None)]
    assert emb("embedding:foo,") == [("foo", 1.0, "foo"), (",", 1.0, None)]


def test_embedding_name_stops_at_invalid_filename_chars() -> None:
    assert emb("embedding:a:b") == [("a", 1.0, "a"), (":b", 1.0, None)]
    assert emb('embedding:a"b') == [("a", 1.0, "a"), ('"b', 1.0, None)]
    assert emb(r"embedding:a\) x") == [("a", 1.0, "a"), (") x", 1.0, None)]


# --------------------------------------------------------------------------- chunking


def test_empty_prompt_is_one_empty_chunk() -> None:
    [chunk] = tokenize_chunks("", char_tok, **SD1)
    assert [t.id for t in chunk] == [BOS, EOS] + [EOS] * 75
    assert all(t.weight == 1.0 for t in chunk)


def test_sd1_vs_zero_padding() -> None:
    [c1] = tokenize_chunks("ab", char_tok, **SD1)
    [c2] = tokenize_chunks("ab", char_tok, **SD2)
    assert [t.id for t in c1] == [BOS, 97, 98, EOS] + [EOS] * 73
    assert [t.id for t in c2] == [BOS, 97, 98, EOS] + [0] * 73


def test_weights_on_tokens() -> None:
    [chunk] = tokenize_chunks("a (bc:1.5)", char_tok, **SD2)
    assert [(t.id, t.weight) for t in chunk[:5]] == [(BOS, 1.0), (97, 1.0), (98, 1.5), (99, 1.5), (EOS, 1.0)]
    assert all(t.weight == 1.0 for t in chunk[5:])


def test_weighted_runs_tokenized_whole() -> None:
    seen: list[str] = []

    def tok(text: str) -> list[int]:
        seen.append(text)
        return [len(text)]

    tokenize_chunks("a  bb\nccc (dddd)", tok, **SD1)
    assert seen == ["a  bb\nccc ", "dddd"]


def test_long_prompt_gives_several_chunks() -> None:
    chunks = tokenize_chunks(" ".join(["w"] * 200), char_tok, **SD2)
    assert len(chunks) == 3  # 75 + 75 + 50
    assert all(len(c) == 77 for c in chunks)
    for c in chunks:
        assert c[0].id == BOS
    assert [len(content(c)) for c in chunks] == [75, 75, 50]
    assert chunks[0][76].id == EOS and chunks[1][76].id == EOS
    assert [t.id for t in chunks[2][51:]] == [EOS] + [0] * 25


def test_short_group_moves_whole_to_next_chunk() -> None:
    # 73 tokens of plain text, then a 3-token weighted group: only 2 slots left -> chunk closed early.
    chunks = tokenize_chunks(" ".join(["a"] * 73) + " (xyz:1.2)", char_tok, **SD2)
    assert len(chunks) == 2
    assert [t.id for t in chunks[0][73:]] == [97, EOS, 0, 0]
    assert [t.id for t in chunks[1][:5]] == [BOS, 120, 121, 122, EOS]


def test_group_that_fits_exactly_stays() -> None:
    chunks = tokenize_chunks(" ".join(["a"] * 72) + " (xyz:1.2)", char_tok, **SD2)
    assert len(chunks) == 1
    assert [t.id for t in chunks[0][72:]] == [97, 120, 121, 122, EOS]  # 75 content tokens: no pad


def test_long_group_is_split_at_boundary() -> None:
    chunks = tokenize_chunks(" ".join(["a"] * 70) + " (" + "b" * 10 + ":1.2)", char_tok, **SD2)
    assert len(chunks) == 2
    assert [t.id for t in content(chunks[0])] == [97] * 70 + [98] * 5
    assert [t.id for t in content(chunks[1])] == [98] * 5


def test_max_word_length_threshold() -> None:
    # A group of exactly max_word_length tokens counts as long (ComfyUI: len >= max_word_length).
    prompt = " ".join(["a"] * 70) + " (" + "b" * 8 + ":1.2)"
    assert [len(content(c)) for c in tokenize_chunks(prompt, char_tok, **SD2)] == [75, 3]
    prompt7 = " ".join(["a"] * 70) + " (" + "b" * 7 + ":1.2)"
    assert [len(content(c)) for c in tokenize_chunks(prompt7, char_tok, **SD2)] == [70, 7]


def test_multi_vector_embedding_is_one_group() -> None:
    sizes = {"style": 4, "big": 12}
    chunks = tokenize_chunks(
        " ".join(["a"] * 73) + " (embedding:style:1.2)", char_tok, **SD2, embedding_size=sizes.get, placeholder=7
    )
    assert len(chunks) == 2
    assert [t.id for t in content(chunks[0])] == [97] * 73
    emb_tokens = content(chunks[1])
    assert emb_tokens == [Token(7, 1.2, "style", k) for k in range(4)]
    # a long embedding is split like a long word
    prompt = " ".join(["a"] * 70) + " embedding:big"
    chunks = tokenize_chunks(prompt, char_tok, bos=BOS, eos=EOS, pad=3, embedding_size=sizes.get)
    assert [len(content(c)) for c in chunks] == [75, 7]
    assert [t.vector for t in content(chunks[1])] == list(range(5, 12))
    assert {t.id for t in content(chunks[1])} == {3}  # placeholder defaults to pad


def test_missing_embedding_is_dropped_and_reported() -> None:
    missing: list[str] = []
    [chunk] = tokenize_chunks("a embedding:nope b", char_tok, **SD1, on_missing_embedding=missing.append)
    assert missing == ["nope"]
    assert [t.id for t in content(chunk)] == [97, 98]
    # without a callback it is silently dropped
    [chunk] = tokenize_chunks("embedding:nope", char_tok, **SD1)
    assert content(chunk) == []


def test_custom_chunk_length_and_tiny_chunks() -> None:
    chunks = tokenize_chunks("abcd efgh", char_tok, **SD2, chunk_length=5)
    assert all(len(c) == 5 for c in chunks)
    # 4-token words are "short" but never fit in 3 slots: split instead of looping forever
    assert [t.id for c in chunks for t in content(c)] == char_tok("abcdefgh")
    with pytest.raises(ValueError):
        tokenize_chunks("a", char_tok, **SD2, chunk_length=2)


def test_chunk_count_equalize() -> None:
    a = tokenize_chunks("x " * 100, char_tok, **SD1)
    b = tokenize_chunks("y", char_tok, **SD1)
    a2, b2 = chunk_count_equalize(a, b, **SD1)
    assert len(a2) == len(b2) == 2
    assert a2 == a and b2[0] == b[0]
    assert [t.id for t in b2[1]] == [BOS, EOS] + [EOS] * 75
    assert len(b) == 1  # input not mutated
    b3, a3 = chunk_count_equalize(b, a, **SD2)
    assert len(b3) == 2 and [t.id for t in b3[1][:3]] == [BOS, EOS, 0]
    same = chunk_count_equalize(a, a, **SD1)
    assert same == (a, a)


# --------------------------------------------------------------------------- properties

SYNTAX_ALPHABET = st.sampled_from(list("ab :.,()[]\\\n1e") + ["embedding:", "(x:1.2)", "0.5"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(SYNTAX_ALPHABET, max_size=40).map("".join)))
def test_parse_weights_never_raises(prompt: str) -> None:
    for seg in parse_weights(prompt):
        assert isinstance(seg.text, str) and seg.text
        assert math.isfinite(seg.weight)
        assert seg.embedding is None or seg.embedding == seg.text


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(st.text(max_size=300), st.lists(SYNTAX_ALPHABET, max_size=120).map("".join)),
    st.integers(min_value=3, max_value=80),
    st.integers(min_value=1, max_value=12),
)
def test_chunks_always_exact_length(prompt: str, chunk_length: int, max_word_length: int) -> None:
    chunks = tokenize_chunks(
        prompt,
        char_tok,
        **SD2,
        chunk_length=chunk_length,
        max_word_length=max_word_length,
        embedding_size=lambda name: len(name) % 5 or None,
    )
    assert chunks
    for c in chunks:
        assert len(c) == chunk_length
        assert c[0] == Token(BOS, 1.0)
        body = c[1:]
        end = [t.id for t in body].index(EOS)  # content never contains EOS with char_tok
        assert all(t == Token(0, 1.0) for t in body[end + 1 :])


PLAIN = st.text(alphabet=st.characters(blacklist_characters="()\\:", blacklist_categories=("Cs",)), max_size=400)


@settings(max_examples=150, deadline=None)
@given(PLAIN)
def test_plain_text_tokens_roundtrip(prompt: str) -> None:
    prompt = prompt.replace("embedding:", "")
    chunks = tokenize_chunks(prompt, char_tok, **SD2)
    got = [t for c in chunks for t in content(c)]
    assert [t.id for t in got] == char_tok(prompt)
    assert all(t.weight == 1.0 and t.embedding is None for t in got)


def recursive_oracle(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """Independent, recursive restatement of the weight rules (balanced input, no escapes)."""
    out: list[tuple[str, float]] = []
    depth, start, plain = 0, 0, ""
    for i, c in enumerate(text):
        if c == "(":
            if depth == 0:
                if plain:
                    out.append((plain, weight))
                plain, start = "", i
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                inner, w = text[start + 1 : i], weight * 1.1
                k = inner.rfind(":")
                if k > 0:
                    try:
                        value = float(inner[k + 1 :])
                    except ValueError:
                        value = math.nan
                    if math.isfinite(value):
                        inner, w = inner[:k], value
                out += recursive_oracle(inner, w)
        elif depth == 0:
            plain += c
    if plain:
        out.append((plain, weight))
    return out


GROUPS = st.recursive(
    st.text(alphabet="ab :.,[]\n1e-", max_size=6),
    lambda inner: st.builds(
        lambda parts, w: "(" + "".join(parts) + w + ")",
        st.lists(inner, max_size=4),
        st.sampled_from(["", ":1.5", ":0.25", ":x", ": 2 ", ":", "::3", ":1e1"]),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(GROUPS, max_size=3).map("".join))
def test_matches_recursive_oracle_on_balanced_prompts(prompt: str) -> None:
    assert pairs(prompt) == recursive_oracle(prompt)
