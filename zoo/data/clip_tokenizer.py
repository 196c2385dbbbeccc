"""CLIP's byte-level BPE tokenizer (vocab 49408, context 77), the one every MobileCLIP variant uses.

Behaviour matches open_clip's ``SimpleTokenizer`` (``ftfy`` clean-up, HTML unescape, whitespace collapse, lower case;
``<start_of_text>`` / ``<end_of_text>`` around each text; zero padding; texts longer than the context are cut and end
with ``<end_of_text>``). The merges file is not downloaded: it is read from a package that ships it. The ``clip``
extra installs ``clip-anytorch`` (MIT, OpenAI's CLIP repackaged), whose ``bpe_simple_vocab_16e6.txt.gz`` is the
same file open_clip ships; the package is never imported, only its data file is read.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_PACKAGES = ("clip", "open_clip")  # packages known to ship VOCAB_FILE (found without importing them)


def default_vocab_path() -> Path:
    """Where the merges file is: ``$ZOO_CLIP_BPE`` if set, else inside an installed package that ships it."""
    env = os.environ.get("ZOO_CLIP_BPE")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"ZOO_CLIP_BPE={env} is not a file; point it at {VOCAB_FILE}")
        return p
    for pkg in _PACKAGES:
        spec = importlib.util.find_spec(pkg)  # a top-level package: locating it does not run its code
        for folder in (spec.submodule_search_locations or []) if spec else []:
            p = Path(folder) / VOCAB_FILE
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"the CLIP BPE merges file ({VOCAB_FILE}) was not found: install the clip extra "
        f"(pip install 'pareto-zoo[clip]', which brings clip-anytorch) or set ZOO_CLIP_BPE to the file")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves (listed first),
    the other bytes to code points from 256 upwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}  # insertion order matters: the vocabulary lists these values in this order
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(keep))
    return table


class CLIPTokenizer:
    """Callable like open_clip's tokenizer: ``tok(texts, context_length=None) -> LongTensor (N, context_length)``.

    Args:
        vocab_path: the gzipped merges file (default: :func:`default_vocab_path`).
        context_length: default output length (77).
    """

    sot_token_text, eot_token_text = "<start_of_text>", "<end_of_text>"

    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 77):
        import regex

        path = Path(vocab_path) if vocab_path else default_vocab_path()
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # the first line is a version header
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [self.sot_token_text, self.eot_token_text]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[self.sot_token_text]
        self.eot_token_id = self.encoder[self.eot_token_text]
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]
        self.context_length = context_length
        self._pattern = regex.compile(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
        self._ws = regex.compile(r"\s+")
        self._cache: dict[str, str] = {self.sot_token_text: self.sot_token_text, self.eot_token_text: self.eot_token_text}

    # text clean-up ------------------------------------------------------------------------------------------
    def _clean(self, text: str) -> str:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:  # ftfy only repairs mojibake; plain text is unchanged without it
            pass
        text = html.unescape(html.unescape(text)).strip()
        return self._ws.sub(" ", text).strip().lower()

    # BPE ----------------------------------------------------------------------------------------------------
    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        ids = []
        for piece in self._pattern.findall(self._clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(piece).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) in self.decoder)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        if n < 2:
            raise ValueError(f"context_length={n}: it must hold at least the start and end tokens (2)")
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > n:  # cut, keeping an end token last (open_clip's default truncation)
                ids = ids[:n]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> CLIPTokenizer:
    return CLIPTokenizer(context_length=context_length)


def get_tokenizer(model_name: str) -> CLIPTokenizer:
    """The tokenizer of a registered CLIP model (``zoo.get_tokenizer('mobileclip_s0')``), with its context length."""
    from zoo.registry import list_models, resolve_cfg

    names = list_models(task="zero-shot-image-classification")
    arch = model_name.split(".", 1)[0]
    if arch not in names:
        raise ValueError(f"no tokenizer for {model_name!r}: tokenizers exist for the CLIP models {', '.join(names)}")
    entry, _, _ = resolve_cfg(model_name)
    from zoo.vision import mobileclip

    ctx = mobileclip._VARIANTS.get(entry.name, {}).get("text", {}).get("context_length", mobileclip.CONTEXT_LENGTH)
    return _tokenizer(ctx)
