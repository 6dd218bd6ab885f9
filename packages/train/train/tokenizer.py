"""Tokenizers: the bundled BPE (the default), bytes, and any Hugging Face ``tokenizers`` tokenizer.json.

A tokenizer here is anything with ``vocab_size``, ``eos_id``, ``encode`` and ``decode``
(the :class:`Tokenizer` protocol). Both classes below also carry a ``fingerprint`` string:
the token cache in :mod:`train.data` is keyed by it, so changing the tokenizer file
re-tokenizes the data instead of silently reusing stale token ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

# Names that tokenizer families use for their end-of-text token, most specific first.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; 256 is EOS. ``vocab_size`` is 257.

    No training, no files, every string round-trips: the right default for a reference
    implementation and for tests.
    """

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # EOS (and anything out of byte range) is dropped; broken UTF-8 becomes U+FFFD, never an error.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` loaded with the Hugging Face ``tokenizers`` library.

    EOS is taken from a ``tokenizer_config.json`` next to the file (its ``eos_token``) when
    there is one, else from the first of :data:`EOS_CANDIDATES` the vocabulary holds. Each
    encoded text starts with the tokenizer's BOS where its own template puts one (Llama 3,
    Mistral), as in the model's pretraining.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = Path(path)
        raw = self.path.read_bytes()
        try:
            self._tok = _RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # the tokenizers library raises its own (Rust-side) exception types
            raise ValueError(f"tokenizer {self.path} is not a Hugging Face tokenizer.json ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); pass --tokenizer byte or "
                             f"the tokenizer.json of a model") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()
        self.bos = self._template_bos()
        self.fingerprint = "hf-" + hashlib.sha256(raw).hexdigest()[:16] + ("-bos" if self.bos else "")

    def _template_bos(self) -> list[int]:
        """[BOS] when the tokenizer's own template starts every text with one token and adds nothing
        else (Llama 3's <|begin_of_text|>, Mistral's <s>): the models saw it at each document start.
        [] otherwise (Qwen adds nothing; a BERT-style [CLS] ... [SEP] pair is not a BOS)."""
        empty = self._tok.encode("", add_special_tokens=True).ids
        probe = self._tok.encode("a", add_special_tokens=False).ids
        return empty if len(empty) == 1 and self._tok.encode("a", add_special_tokens=True).ids == empty + probe else []

    def _find_eos(self) -> int:
        config = self.path.with_name("tokenizer_config.json")
        candidates = list(EOS_CANDIDATES)
        if config.exists():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except (ValueError, AttributeError):
                raise ValueError(f"{config} (next to the tokenizer) is not a JSON object; fix or remove it") from None
            if isinstance(eos, dict):  # {"content": "</s>", ...} in some configs
                eos = eos.get("content")
            if eos:
                candidates.insert(0, eos)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"tokenizer {self.path} has no end-of-text token: looked for {candidates}. Add one of them "
            f"as a special token, or put a tokenizer_config.json with 'eos_token' next to the file")

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled ``text`` (None if the vocabulary lacks it)."""
        return self._tok.token_to_id(text)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        # A BOS where the tokenizer's template has one; no EOS: the data pipeline puts exactly one
        # EOS after each document.
        return self.bos + self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once; the Rust side uses several threads."""
        return [self.bos + e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def default_tokenizer_path() -> Path:
    """The bundled tokenizer: a 4096-token byte-level BPE trained on the bundled corpus
    (``tools/corpus/make_tokenizer.py``)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer.json"


def load_tokenizer(spec: str) -> Tokenizer:
    """``"default"`` -> the bundled BPE; ``"byte"`` -> :class:`ByteTokenizer`; a path to a tokenizer.json
    (or a folder holding one) -> :class:`HFTokenizer`."""
    if spec in ("byte", "bytes"):
        return ByteTokenizer()
    path = default_tokenizer_path() if spec in ("", "default") else Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"--tokenizer {spec!r}: expected 'default', 'byte' or the path of a Hugging Face tokenizer.json "
            f"(or of a folder holding one); {path} does not exist")
    return HFTokenizer(path)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A string that changes whenever the tokenizer maps text differently (cache key).

    Our classes carry ``fingerprint``; for another object we hash what we can observe.
    """
    known = getattr(tokenizer, "fingerprint", None)
    if known:
        return str(known)
    probe = "Meshtron fingerprint probe: The quick brown fox, 123 + 456 = 579. Ünïcödé ✓"
    seen = f"{type(tokenizer).__qualname__}|{tokenizer.vocab_size}|{tokenizer.eos_id}|{tokenizer.encode(probe)}"
    return "obj-" + hashlib.sha256(seen.encode()).hexdigest()[:16]
