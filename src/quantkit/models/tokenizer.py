"""Build a small CLIP BPE tokenizer from a word list, with no download.

transformers' ``CLIPTokenizer`` is fast-only and BPE: a ``merges.txt`` holding only the version line
splits every word into characters. We therefore write, for every word, the chain of merges that builds
it from its characters left to right. BPE applies merges by global rank, so one word's merges can split another
word differently ("h o" from "horse" fires inside "photo"); we simulate the BPE and append merges until every
listed word is exactly one token. Token ids of earlier entries never change when words are added later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "write_clip_tokenizer", "build_clip_tokenizer"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one word's pieces the way the BPE model does: repeatedly merge the best-ranked pair."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if (a, b) in ranks]
        if not pairs:
            break
        best = min(pairs)[0]
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and ranks.get((pieces[i], pieces[i + 1])) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def _vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens: list[str] = [BOS_TOKEN, EOS_TOKEN]
    seen = set(tokens)
    merges: list[tuple[str, str]] = []
    merge_seen: set[tuple[str, str]] = set()

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)

    # Every printable ASCII character, mid-word and word-final, so unknown words still tokenize.
    for code in range(33, 127):
        add(chr(code))
        add(chr(code) + "</w>")
    def chain(pieces: list[str]) -> None:
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            if pair not in merge_seen:
                merge_seen.add(pair)
                merges.append(pair)
            current = current + piece
            add(current)

    vocab_words = sorted({w.lower() for w in words})
    for word in vocab_words:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"tokenizer word {word!r} must be non-empty and contain no spaces")
        chain(list(word[:-1]) + [word[-1] + "</w>"])
    # Repair interference between words: join whatever pieces a word still splits into, at lowest priority.
    for _ in range(len(vocab_words) + 1):
        ranks = {pair: r for r, pair in enumerate(merges)}
        broken = [p for w in vocab_words if len(p := _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)) > 1]
        if not broken:
            break
        for pieces in broken:
            chain(pieces)
    else:
        raise RuntimeError("could not build BPE merges that keep every word whole")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 77) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of a CLIP tokenizer to ``folder``.

    Args:
        folder: destination (created if needed), e.g. ``<pipeline>/tokenizer``.
        words: words that must each map to a single token.
        model_max_length: sequence length the pipeline pads prompts to.

    Returns:
        The special token ids: ``{"bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"}``; copy them
        into the text encoder's config.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    tok_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return {
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[EOS_TOKEN],
        "vocab_size": len(vocab),
    }


def build_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 77):
    """Write the tokenizer files to ``folder`` and load them back as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, words, model_max_length)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
