"""Language-modelling data: packed token windows, a held-out split, and an embedded default corpus.

The default corpus is the source of the running interpreter's standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, ``site-packages`` and test suites excluded): real text present on every machine.
Files are split into train / val / test by a hash of their relative path (at least one file each), so the split is the same on every run and
every rank. Each split is one stream of tokens with an end-of-text token after every file, cut into windows of
``seq_len + 1`` tokens (input = window[:-1], target = window[1:]).

Tokenizers are ``tokenizers.Tokenizer`` objects saved as ``tokenizer.json`` with the run (and next to exported
models), so ``transformers``' fast tokenizers and ``zoo generate`` read them:

* ``"byte"``: byte-level, 3 special tokens (``<|pad|>`` 0, ``<|bos|>`` 1, ``<|endoftext|>`` 2) + 256 bytes = 259 ids;
* ``"bpe"``: a byte-level BPE of ``bpe_vocab_size`` ids trained on the train split with the ``tokenizers`` library
  (cached under ``$ZOO_HOME/data/text``);
* a path to an existing ``tokenizer.json`` (e.g. a Hugging Face model's).

Evaluation is normalised by bytes: :meth:`TextDataModule.token_bytes` gives the UTF-8 byte length of each token
(1 for the end-of-text token, 0 for pad/bos), and :attr:`TextDataModule.unigram_bpb` is the bits per byte of a
unigram model (add-one smoothed counts of the train split) on exactly the validation windows the model is scored on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data.resumable import EpochSeededRandomSampler, ResumableDataLoader

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|endoftext|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


# ---------------------------------------------------------------------------------------------- corpus


def stdlib_files(include_tests: bool = False) -> tuple[Path, list[Path]]:
    """(root, sorted ``*.py`` files) of this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no Python files under the standard library folder {root}")
    return root, files


def split_of(rel_path: str, val_fraction: float, test_fraction: float) -> str:
    """'train' / 'val' / 'test' from a stable hash of the file's relative path."""
    u = zlib.crc32(rel_path.encode()) / 2**32
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


# ---------------------------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """Byte-level ``tokenizers.Tokenizer``: ids 0-2 special, id 3 + b for byte b (a BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({alphabet[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for every byte (what ByteLevel pre-tokenization produces)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def train_bpe(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE (``tokenizers``) with the same special tokens as :func:`byte_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a BPE needs vocab_size > {256 + len(SPECIAL_TOKENS)}, got {vocab_size}; use tokenizer='byte'")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (end-of-text counts 1 byte, pad/bos 0)."""
    n = tokenizer.get_vocab_size()
    out = np.zeros(n, dtype=np.int64)
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    for tok, i in tokenizer.get_vocab().items():
        if i in special:
            out[i] = 1 if tok == "<|endoftext|>" else 0
        else:
            out[i] = len(tok)  # ByteLevel tokens spell one stand-in character per byte
    return out


# ---------------------------------------------------------------------------------------------- datasets


class PackedWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens from one token stream; item = (input [seq_len], target [seq_len])."""

    def __init__(self, tokens: np.ndarray, seq_len: int, starts: np.ndarray | None = None):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"token stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = np.arange(0, len(tokens) - seq_len, seq_len) if starts is None else starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        w = torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class TextDataModule(L.LightningDataModule):
    """Packed causal-LM windows from text files (default: this interpreter's standard library).

    Args:
        files: text files or glob patterns; ``None`` = the standard library's ``*.py`` files.
        include_tests: with the default corpus, also use the standard library's test suites (~19 MB more).
        tokenizer: ``"byte"``, ``"bpe"`` (trained on the train split) or a path to a ``tokenizer.json``.
        bpe_vocab_size: size of the BPE to train (``tokenizer="bpe"`` only).
        seq_len: tokens per training window (the model sees ``seq_len`` inputs and predicts as many targets).
        batch_size: windows per device batch.
        val_fraction / test_fraction: share of files held out (split by a hash of the path).
        val_tokens: cap on the tokens scored per validation pass (evenly spaced windows; ``None`` = all).
        max_bytes: use only the first ``max_bytes`` of the train stream (quick experiments).
        cache_dir: where trained BPE tokenizers are cached (default ``$ZOO_HOME/data/text``).
        pretokenized: a folder with ``train.npy`` / ``val.npy`` (/ ``test.npy``) token streams and ``tokenizer.json``,
            memory-mapped instead of reading ``files`` (for corpora larger than RAM; write one with
            :meth:`save_pretokenized`).
    """

    def __init__(
        self,
        files: list[str] | None = None,
        include_tests: bool = False,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.03,
        test_fraction: float = 0.03,
        val_tokens: int | None = 65536,
        max_bytes: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        pretokenized: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.tokenizer = None
        self.streams: dict[str, np.ndarray] = {}
        self._unigram_bpb: float | None = None

    # ------------------------------------------------------------------------------------------ corpus
    def _corpus(self) -> tuple[Path | None, list[Path]]:
        hp = self.hparams
        if hp.files is None:
            return stdlib_files(hp.include_tests)
        import glob

        out: list[Path] = []
        for pat in hp.files:
            hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
            if not hits:
                raise FileNotFoundError(f"TextDataModule: {pat!r} matches no file")
            out += [Path(h) for h in hits if Path(h).is_file()]
        return None, out

    def _cache_root(self) -> Path:
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir)
        from zoo.checkpoints import zoo_home

        return zoo_home() / "data" / "text"

    def _read_docs(self) -> tuple[dict[str, list[bytes]], list[Path]]:
        hp = self.hparams
        root, files = self._corpus()
        docs: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
        rels = [str(f.relative_to(root)) if root else str(f) for f in files]
        splits = [split_of(r, hp.val_fraction, hp.test_fraction) for r in rels]
        if len(files) >= 3:  # a tiny held-out fraction of few files: hold out the lowest-hash files instead
            order = sorted(range(len(files)), key=lambda i: zlib.crc32(rels[i].encode()))
            for split, i in (("val", order[0]), ("test", order[1])):
                if split not in splits:
                    splits[i] = split
        for f, split in zip(files, splits):
            docs[split].append(f.read_bytes())
        if hp.max_bytes:
            kept, total = [], 0
            for d in docs["train"]:
                if total >= hp.max_bytes:
                    break
                kept.append(d[: hp.max_bytes - total])
                total += len(kept[-1])
            docs["train"] = kept
        for split in ("train", "val"):
            if not docs[split]:
                raise ValueError(
                    f"TextDataModule: the {split} split is empty ({len(files)} files); raise val_fraction or add files"
                )
        return docs, files

    def prepare_data(self) -> None:
        """Train (and cache) the BPE once, on one process, before every rank's ``setup`` reads it."""
        if self.hparams.tokenizer == "bpe" and not self.hparams.pretokenized:
            docs, files = self._read_docs()
            self._make_tokenizer(docs["train"], files)

    def setup(self, stage: str | None = None) -> None:
        if self.streams:
            return
        if self.hparams.pretokenized:
            self._setup_pretokenized(Path(self.hparams.pretokenized))
            return
        docs, files = self._read_docs()
        self.tokenizer = self._make_tokenizer(docs["train"], files)
        for split, ds in docs.items():
            self.streams[split] = self._encode(ds)
        log.info("text data: %s", {k: len(v) for k, v in self.streams.items()})
        self._save_tokenizer_with_run()

    def _setup_pretokenized(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        if not (folder / "train.npy").exists() or not (folder / "val.npy").exists():
            raise FileNotFoundError(f"{folder} needs train.npy and val.npy (see TextDataModule.save_pretokenized)")
        tok = folder / "tokenizer.json"
        if not tok.exists():
            raise FileNotFoundError(f"{folder} has no tokenizer.json: the token ids cannot be interpreted")
        self.tokenizer = Tokenizer.from_file(str(tok))
        for split in ("train", "val", "test"):
            if (folder / f"{split}.npy").exists():
                self.streams[split] = np.load(folder / f"{split}.npy", mmap_mode="r")
        self.streams.setdefault("test", self.streams["val"])
        self._save_tokenizer_with_run()

    def save_pretokenized(self, folder: str | os.PathLike) -> Path:
        """Write the token streams (int32 ``.npy``) and ``tokenizer.json`` for ``pretokenized=`` runs."""
        self.setup()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for split, arr in self.streams.items():
            np.save(out / f"{split}.npy", np.asarray(arr, dtype=np.int32))
        self.tokenizer.save(str(out / "tokenizer.json"))
        return out

    def _make_tokenizer(self, train_docs: list[bytes], files: list[Path]):
        from tokenizers import Tokenizer

        spec = self.hparams.tokenizer
        if spec == "byte":
            return byte_tokenizer()
        if spec == "bpe":
            h = hashlib.sha256()
            for f in files:
                h.update(str(f).encode())
                h.update(str(f.stat().st_size).encode())
            h.update(f"{self.hparams.bpe_vocab_size}|{self.hparams.val_fraction}|{self.hparams.test_fraction}|"
                     f"{self.hparams.max_bytes}".encode())
            path = self._cache_root() / f"bpe-{h.hexdigest()[:16]}.json"
            if path.exists():
                return Tokenizer.from_file(str(path))
            tok = train_bpe([d.decode("utf-8", "replace") for d in train_docs], self.hparams.bpe_vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            tok.save(str(tmp))
            os.replace(tmp, path)
            return tok
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer must be 'byte', 'bpe' or a tokenizer.json path; {spec!r} is none of them")
        return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))

    def _encode(self, docs: list[bytes]) -> np.ndarray:
        if not docs:
            return np.zeros(0, dtype=np.int32)
        eos = np.array([EOS_ID], dtype=np.int32)
        if self.hparams.tokenizer == "byte":  # fast path, identical to the tokenizer's output
            parts = []
            for d in docs:
                parts += [np.frombuffer(d, dtype=np.uint8).astype(np.int32) + len(SPECIAL_TOKENS), eos]
            return np.concatenate(parts)
        eos_id = self.tokenizer.token_to_id("<|endoftext|>")
        eos = np.array([EOS_ID if eos_id is None else eos_id], dtype=np.int32)
        encs = self.tokenizer.encode_batch([d.decode("utf-8", "replace") for d in docs], add_special_tokens=False)
        parts = []
        for e in encs:
            parts += [np.asarray(e.ids, dtype=np.int32), eos]
        return np.concatenate(parts)

    def _save_tokenizer_with_run(self) -> None:
        trainer = self.trainer
        if trainer is None or trainer.logger is None:
            return  # no logger, no run folder to keep it in (exports still carry tokenizer.json)
        out = trainer.log_dir  # a broadcast under DDP/FSDP: every rank must ask
        if out and trainer.is_global_zero:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(str(Path(out) / "tokenizer.json"))

    # ------------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            if self.hparams.tokenizer == "byte":
                return 256 + len(SPECIAL_TOKENS)
            self.setup()
        return self.tokenizer.get_vocab_size()

    @property
    def special_token_ids(self) -> dict[str, int | None]:
        """pad / bos / eos ids of the tokenizer, named like the model config fields."""
        self.setup()
        ids = [self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        return {"pad_token_id": ids[0], "bos_token_id": ids[1], "eos_token_id": ids[2]}

    def token_bytes(self) -> torch.Tensor:
        self.setup()
        return torch.from_numpy(token_byte_lengths(self.tokenizer))

    def _val_starts(self, split: str) -> np.ndarray:
        n = len(self.streams[split])
        starts = np.arange(0, n - self.seq_len, self.seq_len)
        cap = self.hparams.val_tokens
        if cap is not None and len(starts) * self.seq_len > cap:
            k = max(1, cap // self.seq_len)
            starts = starts[np.linspace(0, len(starts) - 1, k).round().astype(np.int64)]
        return starts

    @property
    def unigram_bpb(self) -> float:
        """Bits per byte of an add-one-smoothed unigram model (train counts) on the validation windows."""
        if self._unigram_bpb is None:
            self.setup()
            v = self.vocab_size
            train = self.streams["train"][: 1 << 28]  # counts from (at most) the first 268M train tokens
            counts = np.bincount(np.asarray(train), minlength=v).astype(np.float64) + 1.0
            logp = np.log2(counts / counts.sum())
            tb = token_byte_lengths(self.tokenizer)
            nll = nbytes = 0.0
            for s in self._val_starts("val"):
                y = self.streams["val"][s + 1 : s + 1 + self.seq_len]
                nll -= logp[y].sum()
                nbytes += tb[y].sum()
            self._unigram_bpb = float(nll / max(nbytes, 1))
        return self._unigram_bpb

    # ------------------------------------------------------------------------------------------ loaders
    def train_dataloader(self):
        self.setup()
        ds = PackedWindows(self.streams["train"], self.seq_len)
        self._train_loader = ResumableDataLoader(
            ds, batch_size=self.batch_size, sampler=EpochSeededRandomSampler(ds, self.seed), drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )
        return self._train_loader

    def _eval_loader(self, split: str):
        self.setup()
        if len(self.streams[split]) <= self.seq_len:
            raise ValueError(f"the {split} split has too few tokens for one window of {self.seq_len + 1}")
        ds = PackedWindows(self.streams[split], self.seq_len, self._val_starts(split))
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            loader = getattr(self, "_train_loader", None)
            if loader is not None:
                loader.consumed += 1
        return batch
