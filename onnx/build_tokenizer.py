#!/usr/bin/env python3
"""Build the CLIP BPE `tokenizer.json` read by cac-edge (Rust `tokenizers` crate, v0.22).

The file is built from open_clip's own vocabulary, `bpe_simple_vocab_16e6.txt.gz`, so the ids
are exactly open_clip's (`SimpleTokenizer`): vocabulary order is the 256 byte-to-unicode
symbols, the same with `</w>`, one entry per merge (48 894 merges), then `<|startoftext|>`
(49406) and `<|endoftext|>` (49407). The pipeline is the one Hugging Face writes for CLIP:

    normalizer     NFC -> Replace(\\s+ -> " ") -> Lowercase
    pre-tokenizer  Split(CLIP regex, Removed, invert) -> ByteLevel(no prefix space, no regex)
    model          BPE, end_of_word_suffix "</w>"
    post-processor TemplateProcessing: <|startoftext|> $A <|endoftext|>
    decoder        ByteLevel -> Replace("</w>" -> " ") -> Strip(one trailing space)

open_clip's text clean-up (ftfy, HTML unescape, whitespace, lower case) is done by the runtime
before the tokenizer (src/tokenize.rs); the normalizer here keeps the file usable on its own.

Standard library only. Usage:

    python onnx/build_tokenizer.py OUT.json [--vocab bpe_simple_vocab_16e6.txt.gz]

or, from another script, `build_tokenizer_json(out_path)`.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48 894, as open_clip's SimpleTokenizer slices them
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
VOCAB_SIZE = 49408

# The CLIP pre-tokenizer regex (open_clip's, with HF's spelling of the special tokens).
CLIP_SPLIT_REGEX = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def default_vocab_path() -> str:
    """Locate open_clip's BPE vocabulary in its installed package directory.

    `find_spec` finds the package without executing it (importing open_clip pulls in torch).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed; pass --vocab PATH to bpe_simple_vocab_16e6.txt.gz"
        )
    for directory in spec.submodule_search_locations:
        candidate = os.path.join(directory, VOCAB_FILE_NAME)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{VOCAB_FILE_NAME} not found in the open_clip package")


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table, in byte order (index = byte value)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    bs = printable[:]
    cs = printable[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    # open_clip iterates the dict in insertion order (printable bytes first), not byte order.
    return [chr(table[b]) for b in bs]


def read_merges(vocab_path: str) -> list[tuple[str, str]]:
    """The first N_MERGES merge rules (line 0 is the version header)."""
    with gzip.open(vocab_path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = []
    for line in lines[1 : N_MERGES + 1]:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"malformed merge line in {vocab_path}: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != N_MERGES:
        raise ValueError(f"{vocab_path}: expected {N_MERGES} merges, found {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in open_clip's order."""
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    assert vocab[START_OF_TEXT] == START_OF_TEXT_ID and vocab[END_OF_TEXT] == END_OF_TEXT_ID
    return vocab


def _added_token(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": True,
    }


def _special(token: str, type_id: int = 0) -> dict:
    return {"SpecialToken": {"id": token, "type_id": type_id}}


def _sequence(name: str, type_id: int) -> dict:
    return {"Sequence": {"id": name, "type_id": type_id}}


def build_tokenizer(vocab_path: str | None = None) -> dict:
    """The tokenizer.json document, as a dict (key order is the serialised order)."""
    merges = read_merges(vocab_path or default_vocab_path())
    vocab = build_vocab(merges)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            _added_token(START_OF_TEXT_ID, START_OF_TEXT),
            _added_token(END_OF_TEXT_ID, END_OF_TEXT),
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": CLIP_SPLIT_REGEX},
                    "behavior": "Removed",
                    "invert": True,
                },
                byte_level,
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [_special(START_OF_TEXT), _sequence("A", 0), _special(END_OF_TEXT)],
            "pair": [
                _special(START_OF_TEXT),
                _sequence("A", 0),
                _special(END_OF_TEXT),
                _special(END_OF_TEXT, 1),
                _sequence("B", 1),
                _special(END_OF_TEXT, 1),
            ],
            "special_tokens": {
                token: {"id": token, "ids": [token_id], "tokens": [token]}
                for token, token_id in ((START_OF_TEXT, START_OF_TEXT_ID), (END_OF_TEXT, END_OF_TEXT_ID))
            },
        },
        # "</w>" ends a word: decode bytes first (its characters map to themselves), then turn
        # each suffix into a space and drop the one after the last word.
        "decoder": {
            "type": "Sequence",
            "decoders": [
                dict(byte_level),
                {"type": "Replace", "pattern": {"String": "</w>"}, "content": " "},
                {"type": "Strip", "content": " ", "start": 0, "stop": 1},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": "</w>",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for a, b in merges],
        },
    }


def build_tokenizer_json(out_path: str, vocab_path: str | None = None) -> None:
    """Write tokenizer.json to `out_path` (same bytes on every run)."""
    document = build_tokenizer(vocab_path)
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = out_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.write("\n")
    os.replace(tmp_path, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="path of the tokenizer.json to write")
    parser.add_argument("--vocab", help=f"path to {VOCAB_FILE_NAME} (default: open_clip's copy)")
    args = parser.parse_args(argv)
    build_tokenizer_json(args.out, args.vocab)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
