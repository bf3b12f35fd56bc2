"""CLIP tokenizers without the Hub.

Real SD checkpoints all use the same CLIP BPE vocabulary (49408 tokens). Single-file
checkpoints carry no tokenizer, so we look for one offline, in this order:

1. ``COMFY_FINETUNE_TOKENIZER``: a folder with ``vocab.json`` + ``merges.txt``;
2. ComfyUI's own ``comfy/sd1_tokenizer`` when running inside ComfyUI;
3. ``<models>/tokenizers/clip`` or the ``tokenizer/`` folder of any diffusers model in ``<models>/diffusers``;
4. the Hugging Face cache of ``openai/clip-vit-large-patch14`` (``local_files_only``);
5. the ``bpe_simple_vocab_16e6.txt.gz`` file of an installed ``clip``/``open_clip`` package,
   converted to vocab/merges (the rule is in open_clip's ``SimpleTokenizer``).

Tiny models (tests, the demo model) use a small vocabulary built by :func:`build_vocab`:
every byte character, alone and word-final, plus whole-word merges for a word list.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .. import host
from .errors import FinetuneError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte table: every byte maps to a printable unicode character."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE vocabulary: 256 byte chars, their word-final forms, whole-word merges, BOS, EOS.

    Any text tokenizes (unknown words fall back to characters); listed words become one token.
    """
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    known = set(vocab_list)
    byte_map = bytes_to_unicode()
    for word in sorted({w.lower() for w in words if w.strip()}, key=lambda w: (-len(w), w)):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        if len(symbols) < 2:
            continue
        symbols[-1] += "</w>"
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            if merged not in known:
                merges.append(f"{current} {nxt}")
                vocab_list.append(merged)
                known.add(merged)
            current = merged
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str | os.PathLike, vocab: dict[str, int], merges: list[str], *,
                    pad_token: str = EOS) -> Path:
    """Write a CLIP tokenizer folder that transformers v4 and v5 both read (vocab.json + merges.txt)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")
    return folder


def load_tokenizer(folder: str | os.PathLike):
    """Load a CLIP tokenizer folder (offline)."""
    from transformers import CLIPTokenizer  # noqa: PLC0415

    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.model_max_length = 77
    return tok


def _vocab_from_bpe_gz(gz_path: Path, out: Path) -> Path:
    """Convert open_clip's ``bpe_simple_vocab_16e6.txt.gz`` to vocab.json + merges.txt (49408 tokens)."""
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    merge_lines = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merge_lines] + [BOS, EOS]
    return write_tokenizer(out, {t: i for i, t in enumerate(vocab_list)}, merge_lines)


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("COMFY_FINETUNE_TOKENIZER")
    if env:
        dirs.append(Path(env))
    comfy_dir = host.comfy_tokenizer_dir()
    if comfy_dir is not None:
        dirs.append(comfy_dir)
    dirs.append(host.models_dir() / "tokenizers" / "clip")
    tok_root = host.models_dir() / "tokenizers"
    if tok_root.is_dir():
        dirs.extend(sorted(p.parent for p in tok_root.glob("*/vocab.json")))
    for root in host.folder_paths_for("diffusers"):
        if root.is_dir():
            dirs.extend(sorted(p.parent for p in root.glob("*/tokenizer/vocab.json")))
    return dirs


CLIP_VOCAB_SIZE = 49408


def _is_full_clip_vocab(folder: Path, size: int = CLIP_VOCAB_SIZE) -> bool:
    try:
        return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == size
    except (OSError, ValueError):
        return False


def find_clip_tokenizer(pad: str = "eos", vocab_size: int = CLIP_VOCAB_SIZE):
    """A CLIP tokenizer with ``vocab_size`` tokens from an offline source; ``pad`` is 'eos' or 'zero'.

    The standard vocabulary (49408) has several fallbacks; a custom vocabulary (a small model trained with
    its own tokenizer) must be in one of the candidate folders (e.g. ``<models>/tokenizers/<name>``).
    """

    tried: list[str] = []
    folder: Path | None = None
    for cand in _candidate_dirs():
        tried.append(str(cand))
        if (cand / "vocab.json").exists() and (cand / "merges.txt").exists() and _is_full_clip_vocab(cand, vocab_size):
            folder = cand
            break
    tok = None
    if folder is not None:
        tok = load_tokenizer(folder)
    elif vocab_size != CLIP_VOCAB_SIZE:
        tried.append(f"(only folders with a {vocab_size}-token vocabulary fit this model)")
    else:
        try:
            from transformers import CLIPTokenizer  # noqa: PLC0415

            tok = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", local_files_only=True)
        except Exception:
            tried.append("Hugging Face cache: openai/clip-vit-large-patch14")
        if tok is None:
            for pkg in ("open_clip", "clip"):
                spec = importlib.util.find_spec(pkg) if importlib.util.find_spec(pkg.split(".")[0]) else None
                locs = list(spec.submodule_search_locations or []) if spec else []
                for loc in locs:
                    gz = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
                    if gz.exists():
                        out = host.cache_dir() / "clip_tokenizer"
                        if not _is_full_clip_vocab(out):
                            _vocab_from_bpe_gz(gz, out)
                        tok = load_tokenizer(out)
                        break
                if tok is not None:
                    break
                tried.append(f"python package '{pkg}'")
    if tok is None:
        raise FinetuneError(
            f"no CLIP tokenizer with {vocab_size} tokens found offline (single-file checkpoints carry none); "
            "looked in: " + "; ".join(tried),
            input="ckpt_name",
            fix="put the 'tokenizer' folder of any SD diffusers model (vocab.json + merges.txt) in "
            "<models>/tokenizers/clip, or set COMFY_FINETUNE_TOKENIZER, or `pip install openai-clip`",
        )
    tok.model_max_length = 77
    if pad == "zero":
        tok.pad_token = "!"
    return tok
