"""HYTokenizer: a byte-level BPE tokenizer on tiktoken, reading `hy.tiktoken` (base64 token, rank).

The project's own implementation of the Hunyuan tokenizer interface: BPE ids 0..n-1 from the rank
file, then 210 special tokens at the top of the vocabulary in this order:
<|endoftext|>, <|startoftext|>, <|bos|>, <|eos|> (eos), <|pad|> (pad), <|extra_0|> ... <|extra_204|>.
`tokenizer(text)` adds no special tokens; special-token strings inside text are encoded as their ids.
"""

from __future__ import annotations

import base64
import os
import unicodedata

import tiktoken
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "hy.tiktoken"}
# The cl100k pre-tokenisation split: letters, 1-3 digit numbers, punctuation runs, whitespace.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>"] + [
    f"<|extra_{i}|>" for i in range(205)
]


def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


class HYTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, errors="replace", eos_token="<|eos|>", pad_token="<|pad|>", **kwargs):
        self.vocab_file = vocab_file
        self.errors = errors  # how to decode byte sequences that are not valid UTF-8
        self.mergeable_ranks = load_tiktoken_bpe(vocab_file)
        first_special = len(self.mergeable_ranks)
        self.special_tokens = {tok: first_special + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            "hy", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.decoder = {i: tok for tok, i in self.mergeable_ranks.items()}
        self.decoder.update({i: tok for tok, i in self.special_tokens.items()})
        super().__init__(eos_token=eos_token, pad_token=pad_token, errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def tokenize(self, text: str, allowed_special="all", disallowed_special=(), **kwargs) -> list[bytes | str]:
        text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self.decoder[i] for i in ids]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if isinstance(token, str):
            token = token.encode("utf-8")
        if token not in self.mergeable_ranks:
            raise ValueError(f"{token!r} is not a token of {self.vocab_file}")
        return self.mergeable_ranks[token]

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index not in self.decoder:
            raise ValueError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        raw = b"".join(t if isinstance(t, bytes) else t.encode("utf-8") for t in tokens)
        return raw.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < len(self.mergeable_ranks)]
        return self.encoding.decode(token_ids, errors=errors or self.errors)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "wb") as f:
            for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")
        return (path,)
