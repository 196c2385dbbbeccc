"""Operator search for hybrid LMs: aging (regularized) evolution over layer patterns at a fixed parameter budget.

The method of Nemotron-Flash (Fu et al., arXiv 2511.18890, "Algorithm 1: aging evolutionary search for hybrid
operator combinations"; the paper ranks candidates after short training, whose rankings stabilise early) at CPU
scale, on the hybrid decoder of :mod:`zoo.language.hybrid`:

* a **candidate** is a layer pattern -- a token mixer per position (any registered operator, e.g. ``conv``,
  ``full_attention``, ``deltanet``, ``mamba2``) and whether an FFN follows it -- whose hidden width is then solved so
  the model has ``budget`` parameters (within ``tolerance``): deeper patterns get narrower, so depth and width are
  searched together at equal size;
* every candidate is trained for the same ``steps`` updates on the same batches of the stdlib corpus
  (:class:`zoo.data.text.TextDataModule`, byte tokenizer) and scored by held-out **bits per byte**; its **decode
  latency** (ms per token with the cache after a ``decode_context``-token prompt, batch 1; the lowest of 3 rounds'
  medians, the round least disturbed on a shared CPU) is measured on this machine;
* aging evolution (Real et al. 2019): the first ``population`` candidates are random; after that each one is a
  mutation (change one mixer, toggle one FFN, insert or delete a layer) of the best of ``sample`` candidates drawn from
  the ``population`` most recent ones, so the oldest -- not the worst -- leave the population. The fitness is bits
  per byte; candidates slower than ``max_decode_ms`` (if given) are never chosen as parents.

Outputs in the ``output`` folder: ``search.json`` (the settings), ``history.jsonl`` (one line per candidate, written
and fsynced as each finishes) and ``pareto.png`` (bits/byte vs decode latency, Pareto front drawn). Re-running with the
same folder continues after the last complete line (a kill loses at most the candidate being trained); every random
choice of candidate *i* comes from ``seed`` and *i* and the history before it, so an interrupted + resumed search
writes the same history (latencies aside) as an uninterrupted one.

    zoo lm-search --output runs/lm_search --budget 2e6 --candidates 24 --steps 60

Mixers without an FFN need an FFN-only layer type in the hybrid decoder; where the installed decoder has none
(``ffn_layer_type()`` is None), every mixer keeps its own FFN (LFM2 layers) and FFN placement is not searched -- the
settings say so (``ffn_placement: false``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "SearchSettings", "Candidate", "CorpusData", "ffn_layer_type", "build_config", "solve_width", "count_params",
    "train_and_score", "decode_latency_ms", "run_search", "load_history", "plot_pareto", "main",
    "BudgetError",
]

# preferred order of the mixers offered by default (those registered in the running process)
DEFAULT_OPERATORS = ("full_attention", "conv", "deltanet", "mamba2")
SHORT = {"full_attention": "A", "conv": "C", "deltanet": "D", "mamba2": "M", "m2": "M"}
HISTORY, SETTINGS, PLOT = "history.jsonl", "search.json", "pareto.png"
BYTE_VOCAB = 259  # zoo.data.text's byte tokenizer: 3 special tokens + 256 bytes (known before the corpus is read)


class BudgetError(ValueError):
    """No width of a pattern meets the parameter budget."""


def _operators() -> dict:
    """The registered operators (importing the modules that register the built-in recurrent ones, if present)."""
    from zoo.language import hybrid

    try:  # DeltaNet / Mamba2 live in zoo.layers.recurrent_mixers when installed in this checkout
        import zoo.layers.recurrent_mixers  # noqa: F401
    except ImportError:
        pass
    return hybrid.OPERATORS


def ffn_layer_type() -> str | None:
    """Name of the FFN-only layer type of the hybrid decoder (a layer that is just ``x + FFN(norm(x))``), or None."""
    ops = _operators()
    for name in ("ffn", "f"):
        if name in ops:
            return name
    return None


def mixer_operators(aliases: bool = True) -> list[str]:
    """Registered token mixers (every operator except the FFN-only one); ``aliases=False`` keeps one name per
    operator class (the preferred names of ``DEFAULT_OPERATORS`` first)."""
    ops, ffn = _operators(), ffn_layer_type()
    names = [n for n in DEFAULT_OPERATORS if n in ops] + [n for n in ops if n not in DEFAULT_OPERATORS]
    out, classes = [], set()
    for n in names:
        if n != ffn and (aliases or ops[n] not in classes):
            out.append(n)
            classes.add(ops[n])
    return out


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class SearchSettings:
    """Everything that defines a search (stored in ``search.json``; a resumed search must use the same values,
    except ``candidates``, which may grow)."""

    budget: float = 2e6  # parameters (embedding included)
    tolerance: float = 0.1  # accepted relative distance of a candidate's count from the budget
    operators: tuple[str, ...] = ()  # mixers to choose from; () = every registered one
    ffn_placement: bool = True  # search FFN positions (needs an FFN-only layer type in the decoder)
    min_layers: int = 2  # mixers per pattern
    max_layers: int = 8
    width_multiple: int = 32  # hidden sizes are multiples of this (= attention head size)
    ffn_ratio: float = 3.0  # FFN width = ffn_ratio * hidden, rounded to width_multiple (Nemotron-Flash: 3)
    mamba_d_state: int = 64  # Mamba2 state size (head size = width_multiple, expand 2)
    population: int = 8
    sample: int = 3
    candidates: int = 24
    steps: int = 60
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    seed: int = 0
    val_tokens: int = 16384
    max_bytes: int | None = 4_000_000  # train-stream bytes read from the corpus
    decode_context: int = 128
    decode_steps: int = 16
    threads: int = 1
    max_decode_ms: float | None = None  # latency constraint on parents (None = none)

    def __post_init__(self):
        self.operators = tuple(self.operators)
        problems = []
        for name in ("budget", "candidates", "population", "sample", "steps", "batch_size", "seq_len",
                     "min_layers", "width_multiple", "decode_context", "decode_steps", "threads", "val_tokens"):
            if getattr(self, name) is None or getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.max_layers < self.min_layers:
            problems.append(f"max_layers={self.max_layers} is below min_layers={self.min_layers}")
        if self.sample > self.population:
            problems.append(f"sample={self.sample} cannot exceed population={self.population}")
        if not 0 < self.tolerance < 1:
            problems.append(f"tolerance must be in (0, 1), got {self.tolerance}")
        if problems:
            raise ValueError("lm-search settings: " + "; ".join(problems))

    def resolved(self) -> "SearchSettings":
        """Validated against the registered operators; ``operators=()`` becomes every registered mixer."""
        known = mixer_operators()
        ops = self.operators or tuple(mixer_operators(aliases=False))
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise ValueError(
                f"unknown operator(s) {unknown}: the hybrid decoder knows {sorted(known)} (register new ones with "
                f"zoo.language.hybrid.register_operator)"
            )
        if len(set(ops)) != len(ops):
            raise ValueError(f"operators lists a name twice: {list(ops)}")
        placement = self.ffn_placement
        if placement and ffn_layer_type() is None:
            placement = False  # recorded in search.json: every mixer keeps its FFN
        out = SearchSettings(**{**asdict(self), "operators": ops, "ffn_placement": placement})
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["operators"] = list(self.operators)
        return d


@dataclass
class Candidate:
    """A layer pattern: ``mixers[i]`` with an FFN after it where ``ffn[i]``."""

    mixers: tuple[str, ...]
    ffn: tuple[bool, ...]

    def __post_init__(self):
        self.mixers, self.ffn = tuple(self.mixers), tuple(bool(f) for f in self.ffn)
        if len(self.mixers) != len(self.ffn):
            raise ValueError(f"{len(self.mixers)} mixers but {len(self.ffn)} FFN flags")

    @property
    def pattern(self) -> list[str]:
        """Positions in order, Nemotron-Flash style: a mixer name, then ``"ffn"`` where one follows it."""
        out = []
        for m, f in zip(self.mixers, self.ffn):
            out += [m, "ffn"] if f else [m]
        return out

    @classmethod
    def from_pattern(cls, pattern: Sequence[str]) -> "Candidate":
        mixers, ffn = [], []
        for tok in pattern:
            if tok == "ffn":
                if not mixers or ffn[-1]:
                    raise ValueError(f"pattern {list(pattern)}: 'ffn' must follow a mixer (one FFN per mixer)")
                ffn[-1] = True
            else:
                mixers.append(tok)
                ffn.append(False)
        return cls(tuple(mixers), tuple(ffn))

    def code(self) -> str:
        """Short label, e.g. ``DfMfAfMf`` (D DeltaNet, M Mamba2, A attention, C conv, f FFN)."""
        return "".join(SHORT.get(m, m[:2]) + ("f" if f else "") for m, f in zip(self.mixers, self.ffn))

    def key(self) -> str:
        return " ".join(self.pattern)


# ---------------------------------------------------------------------------------------------- model building


def build_config(cand: Candidate, hidden: int, s: SearchSettings, vocab_size: int):
    """The :class:`~zoo.language.hybrid.HybridConfig` of a candidate at hidden size ``hidden``."""
    from zoo.language.hybrid import HybridConfig

    m = s.width_multiple
    heads = max(1, hidden // m)
    kv = heads // 2 if heads % 2 == 0 else heads  # GQA 2:1 where the head count allows it
    ffn_width = max(m, int(round(s.ffn_ratio * hidden / m)) * m)
    ffn_type = ffn_layer_type() if s.ffn_placement else None
    extra = {"ffn_size": ffn_width, "mamba_headdim": m, "mamba_d_state": s.mamba_d_state}
    if ffn_type is None:
        layer_types, intermediate = list(cand.mixers), ffn_width
    else:  # mixers without their own FFN; FFN-only layers where the pattern has them
        layer_types, intermediate = [ffn_type if t == "ffn" else t for t in cand.pattern], 0
    return HybridConfig(
        vocab_size=vocab_size, hidden_size=hidden, layer_types=tuple(layer_types), intermediate_size=intermediate,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=m,
        max_position_embeddings=max(s.seq_len, s.decode_context + s.decode_steps + 1),
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, extra=extra,
    )


def build_model(config):
    from zoo.language.hybrid import HybridLM

    return HybridLM(config)


def count_params(config) -> int:
    """Parameters of the model of ``config`` (built on the meta device: no memory, milliseconds)."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def solve_width(cand: Candidate, s: SearchSettings, vocab_size: int, max_hidden: int = 8192) -> tuple[int, int]:
    """(hidden size, parameter count) of the width multiple whose count is closest to the budget.

    Raises :class:`BudgetError` when even the closest is further than ``tolerance`` from the budget."""
    m = s.width_multiple
    lo, hi = 1, max_hidden // m
    n_lo = count_params(build_config(cand, lo * m, s, vocab_size))
    if n_lo > s.budget * (1 + s.tolerance):
        raise BudgetError(
            f"parameter budget {s.budget:,.0f} is impossible for {cand.key()!r}: its narrowest width (hidden "
            f"{m}) already has {n_lo:,} parameters; raise --budget or lower --min-layers"
        )
    while lo < hi:  # smallest multiple whose count reaches the budget
        mid = (lo + hi) // 2
        if count_params(build_config(cand, mid * m, s, vocab_size)) < s.budget:
            lo = mid + 1
        else:
            hi = mid
    best = None
    for k in {max(1, lo - 1), lo}:
        n = count_params(build_config(cand, k * m, s, vocab_size))
        if best is None or abs(n - s.budget) < abs(best[1] - s.budget):
            best = (k * m, n)
    if abs(best[1] - s.budget) > s.tolerance * s.budget:
        raise BudgetError(
            f"parameter budget {s.budget:,.0f} cannot be met within {s.tolerance:.0%} by {cand.key()!r}: the closest "
            f"width (hidden {best[0]}) has {best[1]:,} parameters; change --budget, --tolerance or --width-multiple"
        )
    return best


# ---------------------------------------------------------------------------------------------- data, training


@dataclass
class CorpusData:
    """The token streams every candidate trains and is scored on (byte tokenizer)."""

    train: torch.Tensor  # [N] long
    val_windows: torch.Tensor  # [W, seq_len + 1] long
    token_bytes: torch.Tensor  # [vocab] long
    vocab_size: int
    seq_len: int
    unigram_bpb: float = float("nan")

    @classmethod
    def from_text(cls, seq_len: int, val_tokens: int, max_bytes: int | None = None,
                  files: list[str] | None = None) -> "CorpusData":
        """The stdlib corpus (or ``files``) split as :class:`zoo.data.text.TextDataModule` splits it."""
        from zoo.data.text import TextDataModule

        dm = TextDataModule(files=files, tokenizer="byte", seq_len=seq_len, batch_size=1, val_tokens=val_tokens,
                            max_bytes=max_bytes)
        dm.setup("fit")
        val = dm.val_dataloader().dataset
        windows = torch.stack([torch.cat([x[:1], y]) for x, y in (val[i] for i in range(len(val)))])
        return cls(torch.from_numpy(dm.streams["train"].astype("int64")), windows, dm.token_bytes(), dm.vocab_size,
                   seq_len, dm.unigram_bpb)

    def batches(self, steps: int, batch_size: int, seed: int):
        """``steps`` random training windows ``(x, y)``, the same sequence for every candidate of a seed."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.train) - self.seq_len - 1
        if n <= 0:
            raise ValueError(f"the train stream ({len(self.train)} tokens) is shorter than one window")
        offs = torch.arange(self.seq_len + 1)
        for _ in range(steps):
            w = self.train[torch.randint(0, n, (batch_size,), generator=g)[:, None] + offs]
            yield w[:, :-1], w[:, 1:]


def _lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def bits_per_byte(model, data: CorpusData, batch_size: int = 8) -> float:
    """Held-out bits per byte over the validation windows (sum of NLL in bits / sum of target bytes)."""
    model.eval()
    nll = nbytes = 0.0
    for i in range(0, len(data.val_windows), batch_size):
        w = data.val_windows[i : i + batch_size]
        logits = model(w[:, :-1])
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                               reduction="sum").item()
        nbytes += data.token_bytes[w[:, 1:]].sum().item()
    return nll / math.log(2) / max(nbytes, 1)


def train_and_score(model, data: CorpusData, *, steps: int, batch_size: int, lr: float, warmup_steps: int,
                    weight_decay: float, seed: int, min_lr: float | None = None) -> dict[str, float]:
    """Train ``steps`` AdamW updates (timm factory: no decay on norms/biases; linear warm-up then cosine to ``min_lr``
    (default lr/10); gradients clipped to norm 1.0) on the seed's batches; return bits per byte, the mean train loss
    of the last tenth of the steps and the wall time."""
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    floor = 0.1 if min_lr is None else min_lr / lr
    warm = min(warmup_steps, steps // 2 or 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, steps, warm, floor))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for x, y in data.batches(steps, batch_size, seed):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged (loss {loss.item()}) at step {len(losses)}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    bpb = bits_per_byte(model, data)
    tail = losses[-max(1, len(losses) // 10):]
    return {"bpb": bpb, "train_loss": statistics.fmean(tail), "train_seconds": train_s}


@torch.inference_mode()
def decode_latency_ms(model, context: int, steps: int, vocab_size: int, repeats: int = 3) -> float:
    """ms per decoded token (batch 1, with the cache) after a ``context``-token prompt: the median step of each of
    ``repeats`` rounds, and the lowest of those (the round least disturbed by other processes on a shared CPU)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab_size, (1, context), generator=g)
    rounds = []
    for _ in range(repeats):
        times = []
        cache = model.new_cache(context + steps + 1)
        logits = model(prompt, cache=cache, logits_to_keep=1)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for j in range(steps + 1):  # the first step warms up
            t = time.perf_counter()
            logits = model(tok, cache=cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            if j:
                times.append((time.perf_counter() - t) * 1e3)
        rounds.append(statistics.median(times))
    return min(rounds)


# ---------------------------------------------------------------------------------------------- evolution


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"lm-search:{seed}:{index}")  # str seeds hash with SHA-512: same in every process


def _feasible(cand: Candidate, s: SearchSettings, vocab: int) -> tuple[int, int] | None:
    try:
        return solve_width(cand, s, vocab)
    except BudgetError:
        return None


def random_candidate(rng: random.Random, s: SearchSettings) -> Candidate:
    n = rng.randint(s.min_layers, s.max_layers)
    mixers = tuple(rng.choice(s.operators) for _ in range(n))
    ffn = tuple(rng.random() < 0.5 for _ in range(n)) if s.ffn_placement else (True,) * n
    return Candidate(mixers, ffn)


def mutate(parent: Candidate, rng: random.Random, s: SearchSettings) -> tuple[Candidate, str]:
    """One random edit: change a mixer, toggle an FFN, insert or delete a layer (within the depth limits)."""
    mixers, ffn = list(parent.mixers), list(parent.ffn)
    kinds = ["operator"] * (len(s.operators) > 1)
    kinds += ["ffn"] * s.ffn_placement
    kinds += ["insert"] * (len(mixers) < s.max_layers) + ["delete"] * (len(mixers) > s.min_layers)
    kind = rng.choice(kinds)
    i = rng.randrange(len(mixers))
    if kind == "operator":
        mixers[i] = rng.choice([o for o in s.operators if o != mixers[i]])
        what = f"operator {i}: {parent.mixers[i]} -> {mixers[i]}"
    elif kind == "ffn":
        ffn[i] = not ffn[i]
        what = f"ffn {i}: {'on' if ffn[i] else 'off'}"
    elif kind == "insert":
        j = rng.randint(0, len(mixers))
        mixers.insert(j, rng.choice(s.operators))
        ffn.insert(j, rng.random() < 0.5 if s.ffn_placement else True)
        what = f"insert {j}: {mixers[j]}"
    else:
        what = f"delete {i}: {mixers[i]}"
        del mixers[i], ffn[i]
    return Candidate(tuple(mixers), tuple(ffn)), what


def _fitness(rec: dict, s: SearchSettings) -> float:
    if s.max_decode_ms is not None and rec["decode_ms"] > s.max_decode_ms:
        return math.inf
    return rec["bpb"]


def propose(index: int, history: list[dict], s: SearchSettings, vocab: int) -> tuple[Candidate, int, int, dict]:
    """Candidate ``index`` from the history before it: (candidate, hidden size, params, provenance)."""
    rng = _rng(s.seed, index)
    seen = {r["key"] for r in history}
    for attempt in range(100):
        if index < s.population:
            cand, prov = random_candidate(rng, s), {"parent": None, "mutation": "random"}
        else:
            population = history[-s.population:]  # aging: the oldest leave, whatever their score
            sample = rng.sample(population, s.sample)
            parent = min(sample, key=lambda r: (_fitness(r, s), r["index"]))
            cand, what = mutate(Candidate.from_pattern(parent["pattern"]), rng, s)
            prov = {"parent": parent["index"], "mutation": what}
        if attempt < 50 and cand.key() in seen:
            continue  # prefer an unseen pattern
        solved = _feasible(cand, s, vocab)
        if solved is not None:
            return cand, solved[0], solved[1], prov
    raise BudgetError(
        f"no pattern with {s.min_layers}-{s.max_layers} mixers meets the parameter budget {s.budget:,.0f} within "
        f"{s.tolerance:.0%} after 100 tries; change --budget or the depth limits"
    )


def check_budget(s: SearchSettings, vocab: int) -> None:
    """Fail early when the budget cannot hold even the smallest pattern (``min_layers`` of the cheapest mixer,
    narrowest width, no FFN where FFN placement is searched)."""
    smallest = min(
        (count_params(build_config(Candidate((op,) * s.min_layers, (not s.ffn_placement,) * s.min_layers),
                                   s.width_multiple, s, vocab)), op)
        for op in s.operators
    )
    if smallest[0] > s.budget * (1 + s.tolerance):
        raise BudgetError(
            f"parameter budget {s.budget:,.0f} is impossible: the smallest candidate ({s.min_layers} x {smallest[1]!r} "
            f"at hidden {s.width_multiple}) already has {smallest[0]:,} parameters; raise --budget or lower "
            f"--min-layers / --width-multiple"
        )


# ---------------------------------------------------------------------------------------------- files


def load_history(folder: str | os.PathLike) -> list[dict]:
    """The complete records of ``history.jsonl``; a partial last line (a kill while writing) is dropped from the
    file."""
    path = Path(folder) / HISTORY
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    records, good = [], 0
    for n, line in enumerate(lines):
        try:
            if not line.endswith("\n"):
                raise ValueError("no newline")
            rec = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # the interrupted write: drop it
                break
            raise ValueError(f"{path}: line {n + 1} is not a JSON record; the history is damaged") from None
        if rec.get("index") != len(records):
            raise ValueError(f"{path}: line {n + 1} has index {rec.get('index')}, expected {len(records)}")
        records.append(rec)
        good += len(line)
    if good != sum(len(x) for x in lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(lines[: len(records)]))
        os.replace(tmp, path)
    return records


def _append(folder: Path, rec: dict) -> None:
    with open(folder / HISTORY, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_settings(folder: Path, s: SearchSettings) -> None:
    path = folder / SETTINGS
    want = s.to_json()
    if path.exists():
        have = json.loads(path.read_text())
        diff = sorted(k for k in set(want) | set(have) if k != "candidates" and have.get(k) != want.get(k))
        if diff:
            details = ", ".join(f"{k}: {have.get(k)!r} there vs {want.get(k)!r} now" for k in diff)
            raise ValueError(
                f"{folder} holds a search with different settings ({details}); resume with the same settings or "
                f"pass a new --output folder"
            )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(want, indent=1) + "\n")
    os.replace(tmp, path)


def pareto_front(records: Sequence[dict]) -> list[dict]:
    """Records not beaten by another that is at most as slow and at most as many bits per byte, by latency."""
    front, best = [], math.inf
    for r in sorted(records, key=lambda r: (r["decode_ms"], r["bpb"])):
        if r["bpb"] < best:
            front.append(r)
            best = r["bpb"]
    return front


def plot_pareto(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Bits per byte (y) vs decode ms/token (x) of every candidate, coloured by order, Pareto front labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("nothing to plot: the history is empty")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    sc = ax.scatter([r["decode_ms"] for r in records], [r["bpb"] for r in records], c=[r["index"] for r in records],
                    cmap="viridis", s=22, zorder=3)
    fig.colorbar(sc, ax=ax, label="candidate #")
    front = pareto_front(records)
    ax.step([r["decode_ms"] for r in front], [r["bpb"] for r in front], where="post", color="C3", lw=1, alpha=0.7,
            label="Pareto front")
    for r in front:
        ax.annotate(r["code"], (r["decode_ms"], r["bpb"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("decode latency (ms / token, batch 1, CPU)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title or "operator search", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written plot
    return path


# ---------------------------------------------------------------------------------------------- driver


def run_search(settings: SearchSettings, output: str | os.PathLike, *, data: CorpusData | None = None,
               files: list[str] | None = None, log: Callable[[str], None] | None = print,
               on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or continue) the search in ``output``; returns the full history. ``on_record`` sees every new record
    after it is written."""
    s = settings.resolved()
    folder = Path(output)
    vocab = data.vocab_size if data is not None else BYTE_VOCAB
    check_budget(s, vocab)  # before anything is read or written
    folder.mkdir(parents=True, exist_ok=True)
    _write_settings(folder, s)
    if data is None:
        data = CorpusData.from_text(s.seq_len, s.val_tokens, s.max_bytes, files)
    if data.seq_len != s.seq_len or data.vocab_size != vocab:
        raise ValueError(f"data: {data.seq_len}-token windows, vocabulary {data.vocab_size}; the search needs "
                         f"seq_len={s.seq_len} and the byte vocabulary ({vocab})")
    history = load_history(folder)
    log = log or (lambda _msg: None)
    if history:
        log(f"resuming {folder}: {len(history)} of {s.candidates} candidates done")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        for i in range(len(history), s.candidates):
            cand, hidden, params, prov = propose(i, history, s, data.vocab_size)
            cfg = build_config(cand, hidden, s, data.vocab_size)
            torch.manual_seed(s.seed * 100003 + i)
            model = build_model(cfg)
            res = train_and_score(model, data, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                  warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, seed=s.seed)
            ms = decode_latency_ms(model, s.decode_context, s.decode_steps, data.vocab_size)
            rec = {"index": i, "key": cand.key(), "pattern": cand.pattern, "code": cand.code(),
                   "layer_types": list(cfg.layer_types), "hidden_size": hidden, "params": params, **prov,
                   "bpb": res["bpb"], "train_loss": res["train_loss"], "decode_ms": ms,
                   "train_seconds": round(res["train_seconds"], 3)}
            _append(folder, rec)
            history.append(rec)
            log(f"[{i + 1}/{s.candidates}] {rec['code']:<20} d={hidden:<4} {params / 1e6:.2f}M  "
                f"bpb {rec['bpb']:.4f}  decode {ms:.2f} ms/token  ({prov['mutation']})")
            if on_record is not None:
                on_record(rec)
    finally:
        torch.set_num_threads(prev_threads)
    if history:
        plot_pareto(history, folder / PLOT, title=(
            f"{len(history)} candidates, {s.budget / 1e6:g}M params, {s.steps} steps x {s.batch_size}x{s.seq_len} "
            f"tokens, decode @ {s.decode_context} ctx"))
    return history


def _parse(argv: Sequence[str] | None) -> tuple[SearchSettings, argparse.Namespace]:
    d = SearchSettings()
    p = argparse.ArgumentParser(
        prog="zoo lm-search",
        description="Aging-evolution search over hybrid LM layer patterns (mixer per position, FFN placement, "
                    "depth/width) at a fixed parameter budget; short training on the stdlib corpus, scored by "
                    "held-out bits/byte and decode latency. Resumable: re-run with the same --output.",
    )
    p.add_argument("--output", required=True, help="folder for search.json, history.jsonl and pareto.png")
    p.add_argument("--budget", type=float, default=d.budget, help="parameters per candidate (default %(default)g)")
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="relative budget tolerance")
    p.add_argument("--operators", default="", help="comma-separated mixers (default: every registered one)")
    p.add_argument("--no-ffn-placement", action="store_true", help="every mixer keeps its own FFN")
    p.add_argument("--min-layers", type=int, default=d.min_layers)
    p.add_argument("--max-layers", type=int, default=d.max_layers)
    p.add_argument("--width-multiple", type=int, default=d.width_multiple)
    p.add_argument("--ffn-ratio", type=float, default=d.ffn_ratio)
    p.add_argument("--mamba-d-state", type=int, default=d.mamba_d_state)
    p.add_argument("--population", type=int, default=d.population)
    p.add_argument("--sample", type=int, default=d.sample)
    p.add_argument("--candidates", type=int, default=d.candidates, help="total candidates to train")
    p.add_argument("--steps", type=int, default=d.steps, help="training updates per candidate")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-tokens", type=int, default=d.val_tokens)
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="train-stream bytes (0 = all)")
    p.add_argument("--decode-context", type=int, default=d.decode_context)
    p.add_argument("--decode-steps", type=int, default=d.decode_steps)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--max-decode-ms", type=float, default=None, help="parents must decode faster than this")
    p.add_argument("--files", nargs="*", default=None, help="text files / globs instead of the stdlib corpus")
    a = p.parse_args(argv)
    s = SearchSettings(
        budget=a.budget, tolerance=a.tolerance, operators=tuple(o for o in a.operators.split(",") if o),
        ffn_placement=not a.no_ffn_placement, min_layers=a.min_layers, max_layers=a.max_layers,
        width_multiple=a.width_multiple, ffn_ratio=a.ffn_ratio, mamba_d_state=a.mamba_d_state, population=a.population, sample=a.sample,
        candidates=a.candidates, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, seed=a.seed,
        val_tokens=a.val_tokens, max_bytes=a.max_bytes or None, decode_context=a.decode_context,
        decode_steps=a.decode_steps, threads=a.threads, max_decode_ms=a.max_decode_ms,
    )
    return s, a


def main(argv: Sequence[str] | None = None) -> int:
    try:
        s, a = _parse(argv)
        history = run_search(s, a.output, files=a.files)
    except (ValueError, FileNotFoundError) as e:
        print(f"zoo lm-search: error: {e}", file=sys.stderr)
        return 2
    best = min(history, key=lambda r: r["bpb"])
    print(f"best: {best['code']} (hidden {best['hidden_size']}, {best['params']:,} params) bpb {best['bpb']:.4f}, "
          f"{best['decode_ms']:.2f} ms/token; Pareto front: "
          + ", ".join(f"{r['code']} {r['bpb']:.3f}@{r['decode_ms']:.2f}ms" for r in pareto_front(history)))
    print(f"wrote {Path(a.output) / HISTORY} and {Path(a.output) / PLOT}")
    return 0
