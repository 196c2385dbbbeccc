"""Config-driven hybrid decoder-only language model (the shared core of LFM2 and later hybrid families).

Every layer is ``x + Op(RMSNorm(x))`` followed by ``x + SwiGLU(RMSNorm(x))``; the token mixer ``Op`` of layer *i* is
``OPERATORS[config.layer_types[i]]``. Two operators are built in:

* ``"conv"`` -- LFM2's gated short convolution (``in_proj`` -> B, C, x; ``y = B * x``; causal depthwise conv of
  length ``conv_L_cache`` over ``y``; ``out_proj(C * conv(y))``);
* ``"full_attention"`` -- grouped-query attention with per-head RMSNorm on q and k applied before RoPE.

A new operator is one ``nn.Module`` decorated with :func:`register_operator` (constructor ``(config, layer_idx)``,
``forward(x, ctx)``, optional per-layer decode state kept in ``ctx.cache.layers[layer_idx]``) plus its name in
``layer_types``. Module and parameter names follow transformers' ``Lfm2ForCausalLM`` (``model.layers.N.conv.in_proj``,
``model.layers.N.self_attn.q_layernorm``, ``model.embedding_norm``, ...), so Hugging Face checkpoints load without
renaming.

Decoding uses :class:`HybridCache` (a transformers ``Cache`` subclass when transformers is installed): a fixed window
of the last ``L-1`` conv inputs for every conv layer and a key/value buffer for every attention layer (growing, or
allocated once in :class:`HybridStaticCache`); after ``activate_past_recording()`` it can be rolled back (assisted and
prompt-lookup decoding). Masked positions are zeroed before they enter a conv window and are invisible as attention
keys, so any padding side works without a cache, and a left-padded batch decodes exactly like its rows one by one;
``position_ids`` that restart inside a row mark packed sequences.

Fast inference path (one interface for every operator)
------------------------------------------------------
Inference forwards (no autograd) take a faster route that every operator shares; it changes no result beyond float
round-off (greedy fp32 generations equal the reference path token for token, tested). Two optional hooks:

* ``packed_projections = {"qkv": ("q_proj", "k_proj", "v_proj")}`` (class attribute): child ``Linear`` /
  :class:`Int8Linear` layers that read the same input are multiplied as ONE packed matrix (one weight stream, one
  kernel call). :func:`packed_linear` ``(module, "qkv", x)`` returns the tuple of their outputs; the packed matrix is
  built on first use and the children's weights become views into it (no extra memory, checkpoint keys unchanged,
  in-place weight updates stay visible), it is rebuilt when a weight was replaced (``.to(dtype)``, assignment) and
  it is skipped (children run one by one) while autograd records, on meta / distributed tensors or mixed layer kinds.
  :class:`SwiGLU` packs ``w1``/``w3`` (``"w13"``), :class:`GQAttention` ``q``/``k``/``v``; :class:`ShortConv`'s
  ``in_proj`` is one matrix already.
* ``step(x, ctx) -> Tensor``: the single-token decode step, called instead of ``forward`` when ``ctx.decode_step``
  is True -- one new token per row (``x`` is ``[B, 1, hidden]``), a cache, no autograd, no attention
  probabilities requested, the cache not recording its past. It reads and updates *in place* the per-layer state that
  the operator's ``forward`` left in ``ctx.cache.layers[layer_idx]`` (a prefill runs ``forward``, every following
  token runs ``step``), may use ``ctx.rope(...)``, ``ctx.key_mask`` / ``ctx.pad_mask`` like ``forward``, and must
  return what ``forward`` would (to float round-off). Operators without ``step`` keep working: ``forward`` runs.

* ``record_step(prog, x, out)`` (optional): the same step recorded as kernel calls into a
  :class:`zoo.layers.gemv.StepProgram`. When every operator of a stack has it, a batch-1 decode step without padding
  runs as one C call for the whole stack (no Python between the kernels: about a tenth of a 350M model's step on
  this machine); otherwise the ``step`` path runs. :class:`HybridLM` records the embedding row and the head too, so
  its step goes from token id to logits in one call (:func:`run_lm_program`). A program runs no module's
  ``forward``: forward hooks on the LM's embedding, decoder or head send the step through ``forward``; hooks inside
  the layers run on the ``"step"`` / ``"eager"`` paths only.
* ``adds_residual = True`` (class attribute): ``forward(x, ctx, residual=None)`` returns ``residual + output`` itself
  (:func:`out_projection`), so a bf16 prompt adds the layer's residual inside its output product (AMX epilogue).

bf16 prompts (many rows, no autograd) run their products on AMX tiles where the CPU has them
(``zoo.layers.gemv.prefill_linear`` / ``prefill_ffn``: weights read in place, SiLU and residual adds in the epilogues),
their causal attention, RoPE, RMSNorm and short conv in one compiled call each (``ZOO_DISABLE_AMX_GEMM=1``: the stock
products).

The decoder layer, the final norm and the head are shared, so an operator that packs its projections and writes a
``step`` (Nemotron-Flash-style DeltaNet / Mamba2 next) is on the fast path. ``model.set_decode_path("eager")``
(:class:`HybridLM`; ``zoo generate --eager``) turns it off -- the reference path every speed claim is checked against;
``"step"`` keeps the operators' ``step`` but never records a program.

This module imports only PyTorch at import time; :func:`hf_model_classes` builds the transformers classes
(``PreTrainedModel`` base model and causal LM, used by :mod:`zoo.language.lfm2`) on first use.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.utils.checkpoint import checkpoint

__all__ = [
    "HybridConfig", "HybridCache", "HybridDecoder", "HybridLM", "OPERATORS", "register_operator",
    "RMSNorm", "SwiGLU", "ShortConv", "GQAttention", "ContextLengthError", "quantize_int8_", "Int8Linear",
    "Int8Embedding", "HybridStaticCache", "causal_lm_loss", "hf_model_classes", "packed_linear",
]


class ContextLengthError(ValueError):
    """A sequence does not fit the model's configured context (``max_position_embeddings``)."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class HybridConfig:
    """Architecture of a hybrid decoder. ``intermediate_size`` is the *effective* SwiGLU width (no auto-adjust here)."""

    vocab_size: int = 65536
    hidden_size: int = 1024
    layer_types: tuple[str, ...] = ("conv", "conv", "full_attention")
    intermediate_size: int = 4608
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    conv_L_cache: int = 3
    conv_bias: bool = False
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 7
    extra: dict[str, Any] = field(default_factory=dict)  # operator-specific settings of later operators

    def __post_init__(self):
        self.layer_types = tuple(self.layer_types)
        if not self.layer_types:
            raise ValueError("HybridConfig.layer_types is empty: give one operator name per layer")
        unknown = sorted({t for t in self.layer_types if t not in OPERATORS})
        if unknown:
            raise ValueError(
                f"unknown layer type(s) {unknown} in layer_types; known operators: {sorted(OPERATORS)} "
                f"(register new ones with zoo.language.hybrid.register_operator)"
            )
        if "full_attention" in self.layer_types:
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads}"
                )
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; pass head_dim explicitly"
                )
        if self.conv_L_cache < 1:
            raise ValueError(f"conv_L_cache must be >= 1, got {self.conv_L_cache}")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


OPERATORS: dict[str, type[nn.Module]] = {}


def register_operator(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``name`` usable in ``HybridConfig.layer_types``.

    The class needs ``__init__(config, layer_idx)``, ``forward(x, ctx) -> Tensor`` and a ``module_name`` class
    attribute (its attribute name inside the decoder layer, which fixes the checkpoint key names).
    """

    def deco(cls):
        if name in OPERATORS and OPERATORS[name] is not cls:
            raise ValueError(f"operator {name!r} is already registered by {OPERATORS[name].__qualname__}")
        if not getattr(cls, "module_name", None):
            raise ValueError(f"operator class {cls.__qualname__} needs a `module_name` class attribute")
        OPERATORS[name] = cls
        return cls

    return deco


# ---------------------------------------------------------------------------------------------- cache


class KVBuffer:
    """Key/value store of one attention layer: ``[B, kv_heads, capacity, head_dim]``.

    Dynamic buffers grow (amortised, in steps of 64 positions); static ones are allocated once at ``capacity``
    and never grow (the ``cache_implementation="static"`` variant)."""

    def __init__(self, capacity: int = 0, static: bool = False):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self.capacity_hint = capacity
        self.static = static

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        need = self.length + t
        self.reserve(need, k, v)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def reserve(self, need: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Room for ``need`` positions (growing like :meth:`append`); ``k`` / ``v`` give batch, heads, dtype."""
        if self.k is None or need > self.k.shape[2]:
            if self.static and (self.k is not None or need > self.capacity_hint):
                raise ValueError(
                    f"static cache is full: it holds {self.capacity_hint} positions and {need} are needed; create it "
                    f"with a larger max_cache_len (or use the dynamic cache)"
                )
            if self.static:
                cap = self.capacity_hint
            else:
                cap = max(need, self.capacity_hint, 2 * (self.k.shape[2] if self.k is not None else 0))
                cap = 64 * math.ceil(cap / 64)
            shape = (k.shape[0], k.shape[1], cap, k.shape[3])
            if k.device.type == "cpu" and math.prod(shape) * k.element_size() >= 1 << 20:
                # 2 MiB pages from the first touch: decode attention streams these at long contexts
                nk, nv = (_gemv.hugepage_empty(*shape, dtype=t.dtype) for t in (k, v))
            else:
                nk, nv = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None and self.length:
                nk[:, :, : self.length] = self.k[:, :, : self.length]
                nv[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = nk, nv

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[rows.to(self.k.device)], self.v[rows.to(self.v.device)]


class _HybridCacheState:
    """Decode state of a hybrid decoder (the logic of :class:`HybridCache`, which adds transformers' ``Cache`` as a
    base class when transformers is installed).

    ``layers[i]`` belongs to operator *i*: the last ``L-1`` conv inputs ``[B, L-1, hidden]`` for a conv layer, a
    :class:`KVBuffer` for an attention layer, whatever a future operator keeps. The cache also remembers which past
    positions were padding (``key_mask``) and the next RoPE position of every row, so callers pass only new tokens.

    Rolling back (``crop``, used by assisted and prompt-lookup decoding) needs the conv windows of the dropped steps:
    after :meth:`activate_past_recording` every conv layer keeps its inputs since the last ``crop`` (KV buffers can
    always be cut).
    """

    is_compileable = False  # python-side bookkeeping per step; transformers must not auto-compile or build 4-D masks
    is_static = False

    def __init__(self, config: Any = None, max_length: int = 0, *, max_cache_len: int | None = None, **_: Any):
        if isinstance(config, int):
            n, kinds = config, None
        elif config is not None and hasattr(config, "layer_types"):
            kinds = tuple(config.layer_types)
            n = len(kinds)
        elif isinstance(config, (list, tuple)):
            kinds = tuple(config)
            n = len(kinds)
        else:
            raise TypeError(
                f"{type(self).__name__}(config, ...) needs the model config (with layer_types) or the number of "
                f"layers, got {type(config).__name__}"
            )
        self.layers: list[Any] = [None] * n
        self.layer_kinds = kinds
        self.seen = 0  # time steps consumed, padding included
        self.key_mask: torch.Tensor | None = None  # [B, seen] bool, None while no row has padding
        self.next_position: torch.Tensor | None = None  # [B] long
        self.max_length = max_cache_len if max_cache_len is not None else max_length
        self.record_past = False
        self._history: dict[int, torch.Tensor] = {}  # conv layer -> its windows since `_hist_start` (recording)
        self._hist_start: int | None = None

    # ------------------------------------------------------------------ per-operator hooks
    def kv_buffer(self, layer_idx: int) -> KVBuffer:
        if self.layers[layer_idx] is None:
            self.layers[layer_idx] = KVBuffer(self.max_length, static=self.is_static)
        return self.layers[layer_idx]

    def conv_window(self, layer_idx: int, y: torch.Tensor, k: int) -> torch.Tensor:
        """``[B, k-1+T, d]``: the cached last ``k-1`` inputs followed by the new ``y``; stores the new state."""
        st = self.layers[layer_idx]
        window = F.pad(y, (0, 0, k - 1, 0)) if st is None else torch.cat([st.to(y.dtype), y], dim=1)
        kept = window.detach()
        if self.record_past:
            h = self._history.get(layer_idx)
            self._history[layer_idx] = kept if h is None else torch.cat([h, y.detach()], dim=1)
        # a decode step's window is fresh and tiny: keep a view; a prefill's is big: keep a copy of the tail
        tail = kept[:, -(k - 1):]
        self.layers[layer_idx] = tail if y.shape[1] == 1 else tail.clone()
        return window

    def begin(self, past: int) -> None:
        if self.record_past and self._hist_start is None:
            self._hist_start = past

    # ------------------------------------------------------------------ transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length if self.is_static else -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:  # like transformers: the number of layers
        return len(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, seen={self.seen}, recording={self.record_past})"

    @property
    def is_initialized(self) -> bool:
        return self.seen > 0

    @property
    def is_croppable(self) -> bool:
        if any(s is not None and not isinstance(s, (torch.Tensor, KVBuffer)) for s in self.layers):
            return False  # recurrent (deltanet / mamba2) states keep no history to roll back to
        return self.record_past or not any(isinstance(s, torch.Tensor) for s in self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        if self.layer_kinds is not None:
            return [k != "full_attention" for k in self.layer_kinds]
        return [isinstance(s, torch.Tensor) for s in self.layers]

    @property
    def batch_size(self) -> int:
        for s in [self.key_mask, self.next_position, *self.layers]:
            if isinstance(s, torch.Tensor):
                return s.shape[0]
            if isinstance(s, KVBuffer) and s.k is not None:
                return s.k.shape[0]
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' KV update for an attention layer (appends and returns all keys / values so far)."""
        return self.kv_buffer(layer_idx).append(key_states, value_states)

    def activate_past_recording(self) -> None:
        self.record_past = True

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return self.record_past

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers' convention: a non-positive number)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of positions to remove (transformers' convention)"
            )
        n = -int(tokens_to_remove)
        if n:
            new = self.seen - n
            if new < 0:
                raise ValueError(f"cannot remove {n} positions from a cache holding {self.seen}")
            rec = sorted({type(s).__name__ for s in self.layers if s is not None and not isinstance(s, (torch.Tensor, KVBuffer))})
            if rec:
                raise RuntimeError(
                    f"this hybrid cache holds recurrent layer states ({', '.join(rec)}) that cannot be rolled back: "
                    f"assisted / prompt-lookup decoding is unavailable for models with recurrent operators"
                )
            has_conv = any(isinstance(s, torch.Tensor) for s in self.layers)
            if has_conv and (self._hist_start is None or new < self._hist_start):
                raise RuntimeError(
                    "the conv windows of this hybrid cache cannot be rolled back that far: call "
                    "cache.activate_past_recording() before the forwards to undo (it keeps the inputs since the last "
                    "crop)"
                )
            for i, s in enumerate(self.layers):
                if isinstance(s, KVBuffer):
                    s.length = min(s.length, new)
                elif isinstance(s, torch.Tensor):
                    m = new - self._hist_start
                    self.layers[i] = self._history[i][:, m : m + s.shape[1]].clone()
            if self.next_position is not None:
                removed = self.key_mask[:, new:].sum(1) if self.key_mask is not None else n
                self.next_position = self.next_position - removed
            if self.key_mask is not None:
                self.key_mask = self.key_mask[:, :new]
            self.seen = new
        self._history.clear()  # back to the minimal state; recording (if on) restarts at the next forward
        self._hist_start = None

    def select(self, rows: torch.Tensor | Sequence[int]):
        """Keep (and reorder) batch rows in place, e.g. to drop finished sequences or for beam search."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for i, st in enumerate(self.layers):
            if isinstance(st, torch.Tensor):
                self.layers[i] = st[rows.to(st.device)]
            elif hasattr(st, "select"):
                st.select(rows)
        for i, h in self._history.items():
            self._history[i] = h[rows.to(h.device)]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows.to(self.key_mask.device)]
        if self.next_position is not None:
            self.next_position = self.next_position[rows.to(self.next_position.device)]
        return self

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        b = self.batch_size
        if b > 0:
            self.select(torch.arange(b).repeat_interleave(repeats))

    def reset(self) -> None:
        kinds = self.layer_kinds if self.layer_kinds is not None else len(self.layers)
        rec = self.record_past
        _HybridCacheState.__init__(self, kinds, self.max_length)
        self.record_past = rec

    def offload(self, *a, **k) -> None:  # pragma: no cover - nothing to offload on the CPU paths this cache serves
        raise NotImplementedError("the hybrid cache does not offload; use cache_implementation='dynamic' or 'static'")

    prefetch = offload


_CACHE_CLASSES: dict[bool, tuple[type, type]] = {}


def _cache_classes(transformers_base: bool = True) -> tuple[type, type]:
    """(HybridCache, HybridStaticCache). With ``transformers_base`` (and transformers installed) they subclass
    transformers' ``Cache``; they are built on first use, so ``import zoo`` never imports transformers, and the
    pure-PyTorch decode path does not pay for importing it either (plain classes with the same behaviour)."""
    if transformers_base not in _CACHE_CLASSES:
        base: type = object
        if transformers_base:
            try:
                from transformers.cache_utils import Cache as base
            except ImportError:  # pragma: no cover - the `lm` extra is not installed
                base = object

        class HybridCache(_HybridCacheState, base):
            __doc__ = _HybridCacheState.__doc__

        class HybridStaticCache(HybridCache):
            """:class:`HybridCache` whose KV buffers are allocated once at ``max_cache_len`` positions and never grow
            (what ``generate(cache_implementation="static")`` builds)."""

            is_static = True

            def __init__(self, config: Any = None, max_cache_len: int | None = None, **kw: Any):
                if not max_cache_len:
                    raise ValueError("HybridStaticCache needs max_cache_len (the most positions it will hold)")
                super().__init__(config, max_cache_len=max_cache_len, **kw)

        for c in (HybridCache, HybridStaticCache):
            c.__module__ = __name__
            c.__qualname__ = c.__name__
        _CACHE_CLASSES[transformers_base] = (HybridCache, HybridStaticCache)
    return _CACHE_CLASSES[transformers_base]


def __getattr__(name: str):
    if name in ("HybridCache", "HybridStaticCache"):
        return dict(zip(("HybridCache", "HybridStaticCache"), _cache_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _exporting() -> bool:
    """True while torch.export / dynamo trace: data-dependent checks are skipped there (shapes are all we have)."""
    try:
        return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - older torch
        return torch.compiler.is_compiling()


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE inverse frequencies (made once per head size: the decode step should not rebuild them)."""
    with torch.inference_mode(False), torch.no_grad():
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[B, 1, T, head_dim]`` for positions ``[B, T]`` (fp32 angles, cast like transformers does)."""
    freqs = positions[..., None].float() * _inv_freq(head_dim, theta, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class ForwardContext:
    """What every operator needs for one forward call (built once by the decoder, shared by all layers)."""

    positions: torch.Tensor  # [B, T] RoPE positions of the new tokens
    pad_mask: torch.Tensor | None  # [B, T] bool, True = real token; None = no padding among the new tokens
    key_mask: torch.Tensor | None  # [B, past + T] bool over all keys; None = no padding anywhere
    past: int  # time steps already in the cache
    cache: _HybridCacheState | None
    segments: torch.Tensor | None = None  # [B, T] packed-sequence ids (no cache); None = one sequence per row
    attentions: list | None = None  # a list to collect attention probabilities into (output_attentions)
    decode_step: bool = False  # one new token per row, cached, no autograd: operators' ``step`` runs (module doc)
    step_position: int | None = None  # a recorded program's step: the RoPE position of its one token
    _memo: dict = field(default_factory=dict)

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, head_dim] (computed in fp32, cast like transformers does)."""
        key = ("rope", head_dim, theta, dtype)
        if key not in self._memo:
            self._memo[key] = rope_cos_sin(self.positions, head_dim, theta, dtype)
        return self._memo[key]

    def same_segment(self, shift: int) -> torch.Tensor:
        """[B, T, 1] float: 1 where the token ``shift`` steps back belongs to the same packed sequence."""
        key = ("seg", shift)
        if key not in self._memo:
            s = self.segments
            same = torch.zeros_like(s, dtype=torch.bool)
            same[:, shift:] = s[:, shift:] == s[:, :-shift]
            self._memo[key] = same[..., None]
        return self._memo[key]

    def attn_mask(self, t: int, s: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [B|1, 1, T, S] or None, is_causal) for T new queries against S keys."""
        key = ("mask", t, s)
        if key not in self._memo:
            if self.key_mask is None and self.segments is None and (t == 1 or self.past == 0):
                self._memo[key] = (None, t > 1)
            else:
                q_pos = torch.arange(s - t, s, device=device)[:, None]
                k_pos = torch.arange(s, device=device)[None, :]
                mask = (k_pos <= q_pos)[None]  # causal, offset by the past
                if self.segments is not None:  # packed rows: a token sees only its own sequence (past == 0 here)
                    mask = mask & (self.segments[:, :, None] == self.segments[:, None, :])
                if self.key_mask is not None:
                    mask = mask & self.key_mask[:, None, :]  # padded keys are invisible
                if self.segments is not None or self.key_mask is not None:
                    mask = mask | (k_pos == q_pos)  # a padded query still sees itself so no softmax row is empty
                self._memo[key] = (mask[:, None], False)
        return self._memo[key]


# ---------------------------------------------------------------------------------------------- decode kernels
# Batch-1 decoding is a chain of matrix-vector products; zoo.layers.gemv streams them at memory bandwidth (fp32,
# bf16, int8 weight-only; compiled on first use, stock products otherwise). Rows are independent there, so packing
# projections or splitting rows over threads never changes a result.
from zoo.layers import gemv as _gemv  # noqa: E402
from zoo.layers.gemv import NotProgrammable, StepProgram, int8_linear, linear  # noqa: E402


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose single-row inference products use the streaming CPU kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _PackedProjection:
    """Several projections of the same input as one matrix (see ``packed_projections`` in the module docstring).

    The children's weights are re-pointed to consecutive row blocks of one new tensor, so packing costs no memory and
    in-place updates (optimizer steps, ``load_state_dict``) reach both. The packed matrix is re-derived from the first
    child's view at every call and never held here, so replaced weights (``.to(dtype)``) free the old storage;
    ``valid`` notices them by address and storage."""

    def __init__(self, parts: list[nn.Module]):
        self.sizes = [p.out_features for p in parts]
        self.rows = sum(self.sizes)
        self.int8 = isinstance(parts[0], Int8Linear)
        self.names = ("qweight", "scale") if self.int8 else ("weight", "bias")
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: training may follow
            for name in self.names:
                ts = [getattr(p, name) for p in parts]
                if ts[0] is None:
                    continue
                full = torch.cat([t.detach() for t in ts])
                for p, view in zip(parts, full.split(self.sizes)):
                    if isinstance(getattr(p, name), nn.Parameter):
                        getattr(p, name).data = view
                    else:
                        p._buffers[name] = view
        self.ptrs = self._ptrs(parts)

    def _ptrs(self, parts) -> tuple:
        out = []
        for name in self.names:  # every packed tensor (an int8 scale converted on its own must be repacked too)
            ts = [getattr(p, name) for p in parts]
            if ts[0] is None:
                out.append(tuple(t is None for t in ts))
                continue
            out.append((tuple(t.data_ptr() for t in ts), frozenset(t.untyped_storage().data_ptr() for t in ts),
                        ts[0].dtype, ts[0].device))
        return tuple(out)

    def valid(self, parts) -> bool:
        return isinstance(parts[0], Int8Linear) == self.int8 and self._ptrs(parts) == self.ptrs

    def tensors(self, parts) -> list[torch.Tensor | None]:
        """The packed (weight, bias) or (qweight, scale): views over the children's shared storage."""
        out = []
        for name in self.names:
            t = getattr(parts[0], name)
            out.append(None if t is None else t.detach().as_strided((self.rows, *t.shape[1:]), t.stride(),
                                                                     t.storage_offset()))
        return out

    def __call__(self, x: torch.Tensor, parts) -> tuple[torch.Tensor, ...]:
        w, extra = self.tensors(parts)
        if self.int8:
            y = int8_linear(x, w, _scale_in(parts[0], extra, x.dtype))
        else:
            y = linear(x, w, extra)
        return y.split(self.sizes, dim=-1)


def _packable(parts: list[nn.Module]) -> bool:
    kinds = {type(p) for p in parts}
    if len(kinds) != 1 or not (issubclass(next(iter(kinds)), nn.Linear) or kinds == {Int8Linear}):
        return False
    ts = [p.qweight if isinstance(p, Int8Linear) else p.weight for p in parts]
    if any(type(t.data) is not torch.Tensor or t.device.type == "meta" for t in ts):
        return False  # distributed / meta weights: leave them alone
    if isinstance(parts[0], Int8Linear):
        return all(p.bias is None for p in parts)  # (a bias is added outside the int8 kernel; none here)
    same = {(t.dtype, t.device, t.shape[1]) for t in ts}
    return len(same) == 1 and len({p.bias is None for p in parts}) == 1


def packed_linear(module: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of the projections ``module.packed_projections[name]`` on ``x``: one packed matrix product during
    inference, the children one by one while autograd records (or when they cannot be packed)."""
    parts = [getattr(module, c) for c in module.packed_projections[name]]
    if torch.is_grad_enabled():
        return tuple(p(x) for p in parts)
    pk = _packed(module, name, parts)
    return tuple(p(x) for p in parts) if pk is None else pk(x, parts)


def out_projection(proj: nn.Module, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + proj(h)`` (just ``proj(h)`` without a residual): an operator's output projection with the layer's
    residual (operators with ``adds_residual = True``); a bf16 prompt adds it in the product's epilogue."""
    if residual is None:
        return proj(h)
    if type(proj) in (Linear, nn.Linear) and not torch.is_grad_enabled():
        y = _gemv.prefill_linear(h, proj.weight, proj.bias, residual=residual)
        if y is not None:
            return y
    return residual + proj(h)


def fused_ffn(module: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
    """A SwiGLU module's ``w2(silu(w1 x) * w3 x)`` (+ ``residual``) for a many-row bf16 inference input in one call
    (``zoo.layers.gemv.prefill_ffn``: the activation in the first product's epilogue, the residual in the second's),
    or None where that does not apply (the caller runs its own ops)."""
    if torch.is_grad_enabled() or x.dtype is not torch.bfloat16 or x.numel() < 16 * x.shape[-1]:
        return None
    parts = [module.w1, module.w3]
    pk = _packed(module, "w13", parts)
    if pk is None or pk.int8 or module.w2.bias is not None or type(module.w2) not in (Linear, nn.Linear):
        return None
    w13, bias = pk.tensors(parts)
    if bias is not None:
        return None
    return _gemv.prefill_ffn(x, w13, module.w2.weight, residual)


def _packed(module: nn.Module, name: str, parts: list[nn.Module]) -> _PackedProjection | None:
    packs = module.__dict__.setdefault("_zoo_packed", {})
    pk = packs.get(name)
    if pk is None or not pk.valid(parts):  # first use, or a weight was replaced
        if not _packable(parts):
            return None
        packs[name] = pk = _PackedProjection(parts)
    return pk


# ---------------------------------------------------------------------------------------------- step programs
# At batch 1 a decode step runs as one recorded program (zoo.layers.gemv.StepProgram): one C call per token for the
# whole layer stack, no Python between the kernels. An operator joins by defining ``record_step(prog, x, out)``,
# recording into ``prog`` what its ``step`` computes from the normed input buffer ``x`` into ``out`` (and watching
# what it reads, ``prog.watch``); a stack with an operator without it runs the per-operator ``step`` path.


def record_linear(prog: StepProgram, owner: nn.Module, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
    """Record ``out = owner.<name>(x)`` for a ``Linear`` / ``nn.Linear`` or :class:`Int8Linear` child."""
    lin = getattr(owner, name)
    prog.watch(owner, name)
    prog.weight_slots.append((lin, "qweight" if isinstance(lin, Int8Linear) else "weight"))
    if isinstance(lin, Int8Linear):
        prog.watch(lin, "qweight", "scale", "bias")
        prog.linear(x, lin.qweight, out, scale=_program_scale(prog, lin, lin.scale), bias=lin.bias)
    elif isinstance(lin, nn.Linear):
        prog.watch(lin, "weight", "bias")
        prog.linear(x, lin.weight.detach(), out, bias=None if lin.bias is None else lin.bias.detach())
    else:
        raise NotProgrammable(f"{type(lin).__name__} is not a linear layer")


def record_packed(prog: StepProgram, module: nn.Module, name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Record the packed projections ``module.packed_projections[name]`` of ``x``; returns their output buffers."""
    names = module.packed_projections[name]
    parts = [getattr(module, c) for c in names]
    pk = _packed(module, name, parts)
    if pk is None:
        raise NotProgrammable(f"{type(module).__name__}.{name} cannot be packed")
    prog.watch(module, *names)
    for p in parts:
        prog.watch(p, *pk.names)
        prog.weight_slots.append((p, pk.names[0]))
    w, extra = pk.tensors(parts)
    out = prog.scratch(("packed", name), pk.rows)
    if pk.int8:
        prog.linear(x, w, out, scale=_program_scale(prog, parts[0], extra, parts[0].scale))
    else:
        prog.linear(x, w, out, bias=extra)
    return list(out.split(pk.sizes))


def record_norm(prog: StepProgram, owner: nn.Module, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
    norm = getattr(owner, name)
    if type(norm) is not RMSNorm:
        raise NotProgrammable(f"{type(norm).__name__} norm")
    prog.watch(owner, name)
    prog.watch(norm, "weight")
    prog.norm(x, norm.weight.detach(), out, norm.eps)


def record_embedding(prog: StepProgram, decoder: nn.Module, out: torch.Tensor) -> None:
    """Record ``out = decoder.embed_tokens(token)`` for the token id the caller puts in ``prog.words[prog.token_word]``
    (a plain ``nn.Embedding`` or :class:`Int8Embedding`); ``prog.vocab``: the number of rows."""
    emb = decoder.embed_tokens
    prog.watch(decoder, "embed_tokens")
    if type(emb) is nn.Embedding and emb.max_norm is None:
        prog.watch(emb, "weight")
        table, scale = emb.weight.detach(), None
    elif type(emb) is Int8Embedding and emb.dtype is prog.dtype:
        prog.watch(emb, "qweight", "scale")
        table, scale = emb.qweight, _program_scale(prog, emb, emb.scale)
    else:
        raise NotProgrammable(f"{type(emb).__name__} embedding")
    prog.token_word, prog.vocab = prog.dynamic(1), table.shape[0]
    prog.embed(table, scale, out, prog.token_word)


def record_head(prog: StepProgram, lm: nn.Module, h: torch.Tensor) -> None:
    """Record ``lm.forward_head(h)`` (its own ``lm_head`` or the tied embedding, as forward_head) into the logits
    tensor whose address the caller puts in ``prog.words[prog.logits_word]`` (a fresh one per step: no copy)."""
    prog.watch(lm, "lm_head")
    size = torch.empty(lm.config.vocab_size, device="meta")  # (only its size: the output is the caller's tensor)
    prog.logits_word, prog.vocab_out = prog.dynamic(1), size.numel()
    head = lm.lm_head
    if head is not None:
        prog.watch(head, *(("qweight", "scale", "bias") if type(head) is Int8Linear else ("weight", "bias")))
        if type(head) is Int8Linear and head.bias is None:
            prog.linear(h, head.qweight, size, scale=_program_scale(prog, head, head.scale), out_word=prog.logits_word)
        elif isinstance(head, nn.Linear) and head.bias is None:
            prog.linear(h, head.weight.detach(), size, out_word=prog.logits_word)
        else:
            raise NotProgrammable(f"a {type(head).__name__} head")
        return
    emb = lm.model.embed_tokens  # (watched by record_embedding)
    if type(emb) is Int8Embedding:
        prog.linear(h, emb.qweight, size, scale=_program_scale(prog, emb, emb.scale), out_word=prog.logits_word)
    else:
        prog.linear(h, emb.weight.detach(), size, out_word=prog.logits_word)


def _record_stack(module: nn.Module, dtype: torch.dtype, lm: nn.Module | None = None) -> StepProgram:
    (lm if lm is not None else module).__dict__.pop("_zoo_program", None)  # (a failed recording leaves no stale one)
    prog = _record_stack_once(module, dtype, lm)
    storages = {getattr(o, n).untyped_storage().data_ptr() for o, n in prog.weight_slots}
    if len(storages) > 1:  # first recording (or weights replaced since): lay the matrices out in reading order
        del prog
        _gemv.move_to_arena(_record_stack_once(module, dtype, lm).weight_slots)
        for m in module.modules():  # packed projections now live in the arena: keep them (no repacking)
            for name, pk in m.__dict__.get("_zoo_packed", {}).items():
                pk.ptrs = pk._ptrs([getattr(m, c) for c in m.packed_projections[name]])
        prog = _record_stack_once(module, dtype, lm)
    prog.weight_slots.clear()  # (module references: a kept program must not keep replaced layers alive)
    return prog


def _record_stack_once(module: nn.Module, dtype: torch.dtype, lm: nn.Module | None = None) -> StepProgram:
    """The decode step of ``module``'s layer stack and final norm (``prog.x`` in, ``prog.y`` out); with ``lm`` (the
    causal LM around it) from a token id to logits: its embedding row first, the head last (see record_head)."""
    prog = StepProgram(dtype)
    d = module.config.hidden_size
    prog.x, prog.y = prog.buffer(d), prog.buffer(d)
    if lm is not None:
        record_embedding(prog, module, prog.x)
    prog.watch(module, "layers", "embedding_norm")
    for i, layer in enumerate(module.layers):
        prog.watch(module.layers, str(i))
        layer.record_step(prog, prog.x)
    record_norm(prog, module, "embedding_norm", prog.x, prog.y)
    if lm is not None:
        record_head(prog, lm, prog.y)
    return prog.finish()


def run_program(module: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """The final hidden state of a batch-1 decode step through the stack's recorded program, or None where the
    per-operator path must run (padding, another batch size, an operator without ``record_step``, no kernels)."""
    if x.shape[0] != 1 or ctx.key_mask is not None or ctx.pad_mask is not None or ctx.past == 0:
        return None
    entry = module.__dict__.get("_zoo_program")
    if entry is None or entry[0] is not x.dtype or (entry[1] is not None and not entry[1].valid()):
        try:
            prog = _record_stack(module, x.dtype)
        except NotProgrammable:
            prog = None
        module.__dict__["_zoo_program"] = entry = (x.dtype, prog)
    prog = entry[1]
    if prog is None:
        return None
    prog.x.copy_(x.reshape(-1))
    ctx.step_position = int(ctx.positions[0, -1])
    try:
        prog.run(ctx.past, ctx.step_position, ctx)
    except NotProgrammable:
        return None
    return prog.y.clone().view(1, 1, -1)


_TOKEN_DTYPES = (torch.long, torch.int, torch.int16, torch.uint8)


def _hooked(*modules: nn.Module | None) -> bool:
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks) or any(
        m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def _lm_program(lm: nn.Module, entry: tuple | None) -> StepProgram | None:
    """``lm``'s program, recorded again (none kept, or the kept one is no longer valid), or None where it cannot be
    recorded (not again until the embedding changes)."""
    emb = lm.model.embed_tokens
    table = getattr(emb, "weight", None) if type(emb) is nn.Embedding else getattr(emb, "qweight", None)
    key = (id(emb), None if table is None else (table.data_ptr(), table.dtype, getattr(emb, "dtype", None)))
    if entry is not None and entry[1] is None and entry[0] == key:
        return None
    try:
        if type(lm).forward_features is not HybridLM.forward_features or \
                type(lm).forward_head is not HybridLM.forward_head:
            raise NotProgrammable("a subclass's own embedding or head")  # (its decoder still runs a program)
        dt = emb.dtype if type(emb) is Int8Embedding else table.dtype if table is not None else None
        prog = _record_stack(lm.model, dt, lm) if dt is not None else None
    except NotProgrammable:
        prog = None
    lm.__dict__["_zoo_program"] = (key, prog)
    return prog


def run_lm_program(lm: nn.Module, input_ids: torch.Tensor, cache: Any) -> torch.Tensor | None:
    """Logits ``[1, 1, vocab]`` of one new token through ``lm``'s recorded program (embedding row, layer stack, head:
    one C call), or None where :meth:`HybridLM.forward`'s general path must run: another shape or batch, padding
    in the cache, autograd, a non-fast decode path, forward hooks on the modules this skips, an out-of-range id (the
    general path raises), anything not recordable. Same kernels as the general path's program: the same logits.
    (Every Python step between two programs runs on caches the weights just streamed through: kept short.)"""
    dec = lm.model
    if (input_ids.shape != (1, 1) or input_ids.dtype not in _TOKEN_DTYPES or not isinstance(cache, _HybridCacheState)
            or cache.seen == 0 or cache.key_mask is not None or cache.next_position is not None or cache.record_past
            or torch.is_grad_enabled() or dec.decode_path != "fast"
            or cache.seen >= lm.config.max_position_embeddings or _hooked(dec, dec.embed_tokens, lm.lm_head)):
        return None
    entry = lm.__dict__.get("_zoo_program")
    prog = None if entry is None else entry[1]
    if prog is None or not prog.valid():
        prog = _lm_program(lm, entry)
        if prog is None:
            return None
    token = int(input_ids)
    if not 0 <= token < prog.vocab:
        return None
    past, logits = cache.seen, torch.empty(1, 1, prog.vocab_out, dtype=prog.dtype)
    words = prog.words
    words[prog.token_word], words[prog.logits_word] = token, logits.data_ptr()
    try:
        prog.run(past, past, ForwardContext(None, None, None, past, cache, decode_step=True, step_position=past))
    except NotProgrammable:
        return None
    cache.seen = past + 1
    return logits


# ---------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step ([B, 1, ...]: one token per row) or any bf16 input: one call instead of ~10 small ops; fp32
        # prefills keep the stock ops (their sums run in another order, and transformers parity stays bitwise)
        if (not torch.is_grad_enabled() and x.dim() >= 3
                and (x.shape[1] == 1 and x.numel() <= 65536 or x.dtype is torch.bfloat16)):
            y = _gemv.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    packed_projections = {"w13": ("w1", "w3")}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``w2(silu(w1 x) * w3 x)``, plus ``residual`` if given (a bf16 prefill adds it in the product)."""
        y = fused_ffn(self, x, residual)
        if y is not None:
            return y
        gate, up = packed_linear(self, "w13", x)
        if torch.is_grad_enabled():
            y = self.w2(F.silu(gate) * up)
        else:
            y = self.w2(F.silu(gate).mul_(up))  # inference: one buffer fewer, same numbers
        return y if residual is None else residual + y

    def record_step(self, prog: StepProgram, x: torch.Tensor, out: torch.Tensor) -> None:
        gate, up = record_packed(prog, self, "w13", x)
        h = prog.scratch("ffn_hidden", gate.numel())
        prog.silu_mul(gate, up, h)
        record_linear(prog, self, "w2", h, out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register_operator("conv")
class ShortConv(nn.Module):
    """LFM2 gated short convolution: ``out_proj(C * causal_dwconv_L(B * x))`` with B, C, x from one ``in_proj``."""

    module_name = "conv"
    adds_residual = True  # forward(x, ctx, residual): the residual add in the output product (module docstring)

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        d, k = config.hidden_size, config.conv_L_cache
        self.layer_idx = layer_idx
        self.kernel_size = k
        self.in_proj = Linear(d, 3 * d, bias=config.conv_bias)
        self.conv = nn.Conv1d(d, d, kernel_size=k, groups=d, padding=k - 1, bias=config.conv_bias)
        self.out_proj = Linear(d, d, bias=config.conv_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, residual: torch.Tensor | None = None) -> torch.Tensor:
        bcx = self.in_proj(x)
        if (x.shape[1] > 1 and ctx.pad_mask is None and ctx.segments is None and not torch.is_grad_enabled()
                and (ctx.cache is None or not ctx.cache.record_past)):  # a bf16 prompt: one call (compiled kernel)
            st = None if ctx.cache is None else ctx.cache.layers[self.layer_idx]
            got = _gemv.conv_prefill(bcx, st, self.conv.weight, self.conv.bias)
            if got is not None:
                if ctx.cache is not None:
                    ctx.cache.layers[self.layer_idx] = got[1]  # the last k - 1 inputs, as conv_window keeps them
                return out_projection(self.out_proj, got[0], residual)
        b, c, xs = bcx.chunk(3, dim=-1)
        y = b * xs  # [B, T, d]
        if ctx.pad_mask is not None:  # padding never enters the conv window
            y = y * ctx.pad_mask[..., None].to(y.dtype)
        t, k = y.shape[1], self.kernel_size
        w = self.conv.weight[:, 0, :].t().to(y.dtype)  # [k, d]; w[j] multiplies y[t - (k-1) + j]
        if k == 1:
            window = y
        elif ctx.cache is not None:
            window = ctx.cache.conv_window(self.layer_idx, y, k)
        else:
            window = F.pad(y, (0, 0, k - 1, 0))
        if t == 1:
            z = (window * w).sum(1, keepdim=True)
        elif ctx.segments is not None:  # packed rows: taps never reach into the previous sequence
            z = window[:, k - 1 :] * w[k - 1]
            for j in range(k - 1):
                z = z + window[:, j : j + t] * w[j] * ctx.same_segment(k - 1 - j).to(y.dtype)
        else:
            z = window[:, :t] * w[0]
            for j in range(1, k):
                z = z.addcmul_(window[:, j : j + t], w[j])
        if self.conv.bias is not None:
            z = z + self.conv.bias.to(z.dtype)
        return out_projection(self.out_proj, c * z, residual)

    def step(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One token per row: the conv window is updated in place (no new state tensor per step)."""
        st, k = ctx.cache.layers[self.layer_idx], self.kernel_size
        if k == 1 or st is None or st.dtype != x.dtype:
            return self.forward(x, ctx)
        bcx = self.in_proj(x)
        z = _gemv.conv_step(bcx, st, self.conv.weight, self.conv.bias, ctx.pad_mask)  # one call (compiled kernel)
        if z is not None:
            return self.out_proj(z)
        b, c, xs = bcx.chunk(3, dim=-1)
        y = b * xs  # [B, 1, d]
        if ctx.pad_mask is not None:
            y.mul_(ctx.pad_mask[..., None].to(y.dtype))
        window = torch.cat([st, y], dim=1)  # [B, k, d], as forward builds it
        z = (window * self.conv.weight[:, 0, :].t()).sum(1, keepdim=True)
        st.copy_(window[:, 1:])
        if self.conv.bias is not None:
            z = z + self.conv.bias.to(z.dtype)
        return self.out_proj(c.mul_(z))

    def record_step(self, prog: StepProgram, x: torch.Tensor, out: torch.Tensor) -> None:
        d, k, idx = out.numel(), self.kernel_size, self.layer_idx
        if k == 1:
            raise NotProgrammable("a 1-tap conv keeps no state")
        bcx = prog.scratch("conv_bcx", 3 * d)
        record_linear(prog, self, "in_proj", x, bcx)

        def state(ctx: ForwardContext) -> tuple[int]:
            st = ctx.cache.layers[idx]
            if not isinstance(st, torch.Tensor) or st.dtype is not prog.dtype or st.shape != (1, k - 1, d):
                raise NotProgrammable("conv state")
            if not st.is_contiguous():
                st = ctx.cache.layers[idx] = st.contiguous()
            return (st.data_ptr(),)

        z = prog.scratch("conv_z", d)
        prog.watch(self, "conv")
        prog.watch(self.conv, "weight", "bias")
        prog.conv(bcx, prog.dynamic(1, state), self.conv.weight.detach(),
                  None if self.conv.bias is None else self.conv.bias.detach(), z)
        record_linear(prog, self, "out_proj", z, out)


@register_operator("full_attention")
class GQAttention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE; output projection ``out_proj``."""

    module_name = "self_attn"
    adds_residual = True

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attn_head_dim
        self.rope_theta = config.rope_theta
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.out_proj = Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, residual: torch.Tensor | None = None) -> torch.Tensor:
        bsz, t, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(bsz, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(x).view(bsz, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope(self.head_dim, self.rope_theta, q.dtype)
        qr, kr = _gemv.rope_prompt(q, cos, sin), _gemv.rope_prompt(k, cos, sin)  # bf16 prompts: one call each
        q = qr if qr is not None else q * cos + rotate_half(q) * sin
        k = kr if kr is not None else k * cos + rotate_half(k) * sin
        if ctx.cache is not None:
            k, v = ctx.cache.kv_buffer(self.layer_idx).append(k, v)
        if ctx.key_mask is None and ctx.segments is None and ctx.attentions is None and t > 1:
            o = _gemv.attn_prefill(q, k, v, self.head_dim**-0.5)  # a bf16 prompt, causal: AMX tiles (compiled kernel)
            if o is not None:
                return out_projection(self.out_proj, o.view(bsz, t, self.num_heads * self.head_dim), residual)
        mask, causal = ctx.attn_mask(t, k.shape[2], x.device)
        if ctx.attentions is not None:  # explicit softmax so the probabilities can be returned (eager attention)
            rep = self.num_heads // self.num_kv_heads
            kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            scores = (q @ kk.transpose(-1, -2)) * self.head_dim**-0.5
            if mask is None and causal:
                mask = torch.ones(t, kk.shape[2], dtype=torch.bool, device=x.device).tril(kk.shape[2] - t)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.float().softmax(-1).to(q.dtype)
            ctx.attentions.append(probs)
            o = probs @ vv
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
        return out_projection(self.out_proj, o.transpose(1, 2).reshape(bsz, t, self.num_heads * self.head_dim),
                              residual)

    packed_projections = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def step(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One query per row: packed q/k/v product, the KV buffer written in place, and grouped attention in one
        pass over the cache (``zoo.layers.gemv.attn_decode``; without it two small batched products: the fused SDPA
        kernel costs more than the arithmetic for a single query)."""
        bsz, hd, kvh = x.shape[0], self.head_dim, self.num_kv_heads
        q, k, v = packed_linear(self, "qkv", x)
        q = self.q_layernorm(q.view(bsz, 1, self.num_heads, hd)).transpose(1, 2)
        k = self.k_layernorm(k.view(bsz, 1, kvh, hd)).transpose(1, 2)
        v = v.view(bsz, 1, kvh, hd).transpose(1, 2)
        cos, sin = ctx.rope(hd, self.rope_theta, q.dtype)
        qr, kr = _gemv.rope(q, cos, sin), _gemv.rope(k, cos, sin)  # one call each (compiled kernel)
        q = qr if qr is not None else q * cos + rotate_half(q) * sin
        k = kr if kr is not None else k * cos + rotate_half(k) * sin
        k, v = ctx.cache.kv_buffer(self.layer_idx).append(k, v)  # [B, kv_heads, S, hd]
        keep = None
        if ctx.key_mask is not None:
            keep = ctx._memo.get("step_keys")
            if keep is None:  # padded keys are invisible; the new (real) token always sees itself
                keep = ctx._memo["step_keys"] = F.pad(ctx.key_mask[:, :-1], (0, 1), value=True)[:, None, None]
        o = _gemv.attn_decode(q, k, v, keep, hd**-0.5)  # one pass over the cache, fp32 softmax (compiled kernel)
        if o is not None:
            return self.out_proj(o.reshape(bsz, 1, self.num_heads * hd))
        scores = torch.matmul(q.reshape(bsz, kvh, -1, hd), k.transpose(2, 3)).mul_(hd**-0.5)  # [B, kvh, rep, S]
        if keep is not None:
            scores.masked_fill_(~keep, float("-inf"))
        probs = scores.softmax(-1) if scores.dtype == torch.float32 else scores.float().softmax(-1).to(v.dtype)
        o = torch.matmul(probs, v)  # [B, kvh, rep, hd]: heads in q_proj order
        return self.out_proj(o.reshape(bsz, 1, self.num_heads * hd))

    def record_step(self, prog: StepProgram, x: torch.Tensor, out: torch.Tensor) -> None:
        h, kvh, hd, idx, dt = self.num_heads, self.num_kv_heads, self.head_dim, self.layer_idx, prog.dtype
        q, k, v = record_packed(prog, self, "qkv", x)
        qn, kn = q, k
        if not isinstance(self.q_layernorm, nn.Identity) or not isinstance(self.k_layernorm, nn.Identity):
            qn, kn = prog.scratch("attn_qn", h * hd), prog.scratch("attn_kn", kvh * hd)
            record_norm(prog, self, "q_layernorm", q, qn)
            record_norm(prog, self, "k_layernorm", k, kn)
        prog.watch(self, "q_layernorm", "k_layernorm")
        key = ("rope", hd, self.rope_theta)
        if key not in prog.memo:  # cos / sin rows of this step's position, from tables of 256 positions
            table: dict = {}

            def rows(ctx: ForwardContext, theta: float = self.rope_theta) -> tuple[int, int]:
                pos = ctx.step_position
                block = pos >> 8
                if table.get("block") != block:
                    cos, sin = rope_cos_sin(torch.arange(block << 8, (block + 1) << 8)[None], hd, theta, dt)
                    table.update(block=block, cos=cos.contiguous(), sin=sin.contiguous())
                off = (pos & 255) * hd * table["cos"].element_size()
                return table["cos"].data_ptr() + off, table["sin"].data_ptr() + off

            prog.memo[key] = prog.dynamic(2, rows)
        qr, kr = prog.scratch("attn_qr", h * hd), prog.scratch("attn_kr", kvh * hd)
        prog.rope(qn, prog.memo[key], qr, h, hd)
        prog.rope(kn, prog.memo[key], kr, kvh, hd)
        like = torch.empty(1, kvh, 1, hd, dtype=dt)

        def kv(ctx: ForwardContext) -> tuple[int, int, int]:
            buf = ctx.cache.kv_buffer(idx)
            if buf.length != ctx.past or (buf.k is not None and (buf.k.shape[0] != 1 or buf.k.dtype is not dt)):
                raise NotProgrammable("KV buffer")
            buf.reserve(buf.length + 1, like, like)
            return buf.k.data_ptr(), buf.v.data_ptr(), buf.k.stride(1)

        def grown(ctx: ForwardContext) -> None:
            ctx.cache.layers[idx].length += 1

        word = prog.dynamic(3, kv)
        prog.on_done(grown)
        o = prog.scratch("attn_o", h * hd)
        prog.kv_store(kr, v, word, kvh, hd)
        prog.attention(qr, o, word, h, kvh, hd, hd**-0.5)
        record_linear(prog, self, "out_proj", o, out)


class DecoderLayer(nn.Module):
    # transformers' activation-checkpointing protocol: PreTrainedModel.gradient_checkpointing_enable() sets these
    gradient_checkpointing = False
    _gradient_checkpointing_func: Callable | None = None

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        op_cls = OPERATORS[config.layer_types[layer_idx]]
        self.layer_type = config.layer_types[layer_idx]
        self.op_name = op_cls.module_name
        self.operator_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.add_module(self.op_name, op_cls(config, layer_idx))
        # intermediate_size=0: no FFN sublayer (patterns whose FFNs are layers of their own, e.g. Nemotron-Flash)
        has_ffn = config.intermediate_size > 0
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps) if has_ffn else None
        self.feed_forward = SwiGLU(config.hidden_size, config.intermediate_size) if has_ffn else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        op = getattr(self, self.op_name)
        if ctx.decode_step and hasattr(op, "step"):  # the fast single-token path (module docstring)
            x = x + op.step(self.operator_norm(x), ctx)
        elif getattr(op, "adds_residual", False):  # it adds the residual itself (in its product for bf16 prompts)
            x = op(self.operator_norm(x), ctx, residual=x)
        else:
            x = x + op(self.operator_norm(x), ctx)
        if self.feed_forward is None:
            return x
        if isinstance(self.feed_forward, SwiGLU):  # it adds the residual itself (in its product for bf16 prefills)
            return self.feed_forward(self.ffn_norm(x), residual=x)
        return x + self.feed_forward(self.ffn_norm(x))

    def record_step(self, prog: StepProgram, x: torch.Tensor) -> None:
        """Record this layer's decode step, updating the residual buffer ``x`` in place (see ``run_program``)."""
        op = getattr(self, self.op_name)
        if not hasattr(op, "record_step"):
            raise NotProgrammable(f"operator {type(op).__name__} has no record_step")
        prog.watch(self, self.op_name, "feed_forward")
        d = x.numel()
        normed, delta = prog.scratch("normed", d), prog.scratch("delta", d)
        record_norm(prog, self, "operator_norm", x, normed)
        op.record_step(prog, normed, delta)
        prog.add(x, delta, x)
        if self.feed_forward is not None:
            record_norm(prog, self, "ffn_norm", x, normed)
            self.feed_forward.record_step(prog, normed, delta)
            prog.add(x, delta, x)


def build_decoder_modules(module: nn.Module, config: HybridConfig) -> None:
    """Give ``module`` the decoder's submodules (``embed_tokens``, ``layers``, ``embedding_norm``): shared by
    :class:`HybridDecoder` and the transformers base model so both have transformers' ``Lfm2Model`` key layout."""
    module.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
    module.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
    module.embedding_norm = RMSNorm(config.hidden_size, config.norm_eps)


def run_decoder(
    module: nn.Module, x: torch.Tensor, ctx: ForwardContext, hidden_states: list | None = None
) -> torch.Tensor:
    """The layer stack and final norm over embeddings ``x``. With ``hidden_states`` (a list) it collects what
    transformers returns for ``output_hidden_states``: the embeddings, every layer's output, the last one normed."""
    ckpt_ok = module.training and torch.is_grad_enabled()
    path = getattr(module, "decode_path", "fast")
    ctx.decode_step = ctx.decode_step and hidden_states is None and path != "eager"
    if ctx.decode_step and path == "fast":
        y = run_program(module, x, ctx)
        if y is not None:
            return y
    for layer in module.layers:
        if hidden_states is not None:
            hidden_states.append(x)
        if layer.gradient_checkpointing and ckpt_ok:
            fn = layer._gradient_checkpointing_func or functools.partial(checkpoint, use_reentrant=False)
            x = fn(layer.__call__, x, ctx)
        else:
            x = layer(x, ctx)
    x = module.embedding_norm(x)
    if hidden_states is not None:
        hidden_states.append(x)
    return x


class HybridDecoder(nn.Module):
    """Embedding, the layer stack and the final ``embedding_norm`` (transformers' ``Lfm2Model`` layout)."""

    decode_path = "fast"  # "step" (no program) or "eager" (no operator ``step``); see HybridLM.set_decode_path

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        build_decoder_modules(self, config)

    @property
    def grad_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self.layers)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, hidden_states: list | None = None) -> torch.Tensor:
        return run_decoder(self, x, ctx, hidden_states)


# ---------------------------------------------------------------------------------------------- causal LM


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    **_: Any,
) -> torch.Tensor:
    """Next-token cross-entropy with transformers' conventions (what ``Trainer`` relies on).

    ``labels`` are aligned with the inputs (position *t* is predicted from the tokens before it), ``-100`` is
    ignored. ``shift_labels`` (already aligned with the logits, e.g. under context parallelism) replace ``labels``.
    With ``num_items_in_batch`` the summed loss is divided by it -- the number of scored tokens over all
    gradient-accumulation micro-batches -- instead of averaged per micro-batch, so accumulated steps equal one big
    batch. Computed in fp32.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = shift_labels.reshape(-1).to(flat.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat, target, ignore_index=ignore_index)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Sequence ids [B, T] when ``position_ids`` restart inside a row (packed sequences), else None."""
    if position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not _exporting() and not bool(starts.any()):
        return None
    return F.pad(starts.long().cumsum(1), (1, 0))


def build_context(
    max_positions: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: _HybridCacheState | None,
    output_attentions: bool = False,
) -> ForwardContext:
    """Positions, padding masks and cache bookkeeping for one forward call of ``input_ids`` ([B, T] new tokens).

    Without a cache any mask works (left, right or inner padding) and ``position_ids`` that restart inside a row
    mark packed sequences, which then see only themselves. With a cache the last token of every row must be real
    (left padding), because the conv windows and positions continue from it.
    """
    bsz, t = input_ids.shape[:2]
    past = cache.seen if cache is not None else 0
    dev = input_ids.device
    exporting = _exporting()
    if past + t > max_positions:
        raise ContextLengthError(
            f"sequence of {past + t} tokens ({past} cached + {t} new) exceeds the model's context "
            f"max_position_embeddings={max_positions}; shorten the prompt (or build the "
            f"model with a larger max_position_embeddings)"
        )
    new_mask = key_mask = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be 2-D [batch, length] with 1 = real token, 0 = padding; got shape "
                f"{tuple(attention_mask.shape)} (4-D masks are built inside the model)"
            )
        m = attention_mask.to(device=dev).bool()
        if m.shape[0] != bsz or m.shape[1] not in (t, past + t):
            raise ValueError(
                f"attention_mask of shape {tuple(m.shape)} does not fit {bsz} rows of {t} new tokens after "
                f"{past} cached ones: pass [B, {t}] (new tokens) or [B, {past + t}] (whole sequence)"
            )
        new_mask = m[:, -t:]
        if m.shape[1] == past + t and past:
            key_mask = m
        elif past:
            prev = cache.key_mask if cache.key_mask is not None else torch.ones(bsz, past, dtype=torch.bool, device=dev)
            key_mask = torch.cat([prev, new_mask], dim=1)
        else:
            key_mask = new_mask
        if not exporting:
            last = new_mask[:, -1]
            if cache is not None and bool(last.any()) and not bool(last.all()):
                # some rows would continue after their padding, others not: a right-padded batch
                raise ValueError(
                    "attention_mask ends in padding in some rows while decoding with a cache: hybrid "
                    "(recurrent-state) models continue every row from its last position, so pad prompts on the "
                    "LEFT (tokenizer.padding_side = 'left'). Right padding is fine for training / scoring forwards "
                    "without a cache."
                )
            if bool(key_mask.all()):
                new_mask = key_mask = None
    elif cache is not None and cache.key_mask is not None:
        key_mask = torch.cat([cache.key_mask, torch.ones(bsz, t, dtype=torch.bool, device=dev)], dim=1)
    segments = None
    if position_ids is not None:
        position_ids = position_ids.to(dev)
        if position_ids.ndim == 1:
            position_ids = position_ids[None]
        position_ids = position_ids.expand(bsz, t)
        if cache is None:
            segments = _packed_segments(position_ids)
    else:
        if cache is None or (new_mask is None and cache.next_position is None):
            # like transformers' forward: 0..T-1 whatever the mask (RoPE is relative, so a left-padded row scores
            # as it would alone); with a cache, positions skip padding as generate()'s position_ids do
            position_ids = torch.arange(past, past + t, device=dev).expand(bsz, t)
        else:
            start = cache.next_position if cache is not None and cache.next_position is not None else None
            if start is None:
                start = torch.full((bsz,), past, dtype=torch.long, device=dev)
            steps = new_mask.long() if new_mask is not None else torch.ones(bsz, t, dtype=torch.long, device=dev)
            position_ids = (start[:, None] + steps.cumsum(1) - 1).clamp_min(0)
    if cache is not None:
        cache.begin(past)
        cache.seen = past + t
        cache.key_mask = key_mask
        if new_mask is not None or cache.next_position is not None:
            cache.next_position = position_ids[:, -1] + 1
    step = (cache is not None and t == 1 and not output_attentions and segments is None and not cache.record_past
            and not torch.is_grad_enabled())
    return ForwardContext(position_ids, new_mask, key_mask, past, cache, segments, [] if output_attentions else None,
                          decode_step=step)


class HybridLM(nn.Module):
    """Causal LM over a :class:`HybridDecoder`; tied embeddings unless ``config.tie_word_embeddings`` is False.

    ``forward(input_ids, attention_mask=None, cache=None)`` returns logits ``[B, T, vocab]``; pass a cache from
    :meth:`new_cache` to decode incrementally (the cache is updated in place).
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.model = HybridDecoder(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_features = self.head_hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.apply(self._init_weights)

    # ----------------------------------------------------------------------------------- timm-style API
    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None and m.weight.device.type != "meta":
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head if self.lm_head is not None else self.model.embed_tokens

    def get_classifier(self) -> nn.Module:
        return self.get_output_embeddings()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^model\.embed_tokens", "blocks": r"^model\.layers\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim < 2}

    def set_decode_path(self, path: str = "fast") -> "HybridLM":
        """``"fast"`` (default): single-token inference forwards run the operators' ``step`` with packed projections,
        at batch 1 as one recorded program per step where every operator can be recorded (module docstring);
        ``"step"``: the operators' ``step`` one by one, never a program; ``"eager"``: every forward runs ``forward``
        (the reference the fast paths are tested against). Returns the model."""
        if path not in ("fast", "step", "eager"):
            raise ValueError(f"decode path must be 'fast', 'step' or 'eager', got {path!r}")
        self.model.decode_path = path
        return self

    def new_cache(self, max_length: int = 0, static: bool = False) -> "HybridCache":
        """An empty decode cache; ``max_length`` pre-sizes the KV buffers (they grow when needed), or with
        ``static=True`` fixes their size."""
        # a transformers Cache when transformers is loaded anyway; plain (same behaviour) otherwise, so
        # pure-PyTorch decoding never waits for the transformers import
        dynamic, static_cls = _cache_classes("transformers" in sys.modules)
        if static:
            return static_cls(self.config, max_cache_len=max_length)
        return dynamic(self.config, max_length)

    # ----------------------------------------------------------------------------------- forward
    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, T, hidden]`` (after ``embedding_norm``)."""
        if inputs_embeds is None:
            if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            inputs_embeds = self.model.embed_tokens(input_ids)
        ids_like = inputs_embeds[..., 0] if input_ids is None else input_ids
        ctx = build_context(self.config.max_position_embeddings, ids_like, attention_mask, position_ids, cache)
        return self.model(inputs_embeds, ctx)

    def forward_head(self, hidden: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return hidden
        if self.lm_head is not None:
            return self.lm_head(hidden)
        emb = self.model.embed_tokens
        if isinstance(emb, Int8Embedding):
            return emb.as_head(hidden)
        return linear(hidden, emb.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` (only the last ``logits_to_keep`` positions when > 0)."""
        if cache is not None and attention_mask is None and position_ids is None and inputs_embeds is None:
            logits = run_lm_program(self, input_ids, cache)  # a batch-1 decode step: one C call, token to logits
            if logits is not None:
                return logits
        h = self.forward_features(input_ids, attention_mask, cache, position_ids, inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.forward_head(h)

    # ----------------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled continuation, returned like transformers: ``[B, prompt + new]`` token ids.

        ``attention_mask`` marks real tokens of left-padded prompts. ``streamer`` is anything with ``put(ids)`` and
        ``end()`` (e.g. ``transformers.TextStreamer``); it gets the prompt first, then each new token as it is made.
        Rows that produced ``eos_token_id`` are filled with ``pad_token_id`` afterwards.
        """
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        bsz, t = input_ids.shape
        if t == 0:
            raise ValueError("generate() needs at least one prompt token")
        ctx_len = self.config.max_position_embeddings
        if t > ctx_len:
            raise ContextLengthError(
                f"prompt of {t} tokens is longer than the model's context max_position_embeddings={ctx_len}; "
                f"shorten the prompt"
            )
        if t + max_new_tokens > ctx_len:
            raise ContextLengthError(
                f"prompt of {t} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"max_position_embeddings={ctx_len}; lower max_new_tokens to at most {ctx_len - t}"
            )
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos = torch.tensor([] if eos_token_id is None else list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=input_ids.device)
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        pad = 0 if pad is None else pad
        cache = self.new_cache(t + max_new_tokens)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = self(input_ids, attention_mask, cache=cache, logits_to_keep=1)
        out = [input_ids]
        done = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = self._next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt[:, None])
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos.numel():
                done |= torch.isin(nxt, eos)
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = self(nxt[:, None], cache=cache)
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)

    @staticmethod
    def _next_token(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        """The next token of every row from its last logits ``[B, vocab]`` (any float dtype)."""
        if not do_sample:
            return _gemv.argmax(logits)  # (one compiled pass over bf16 / fp32 logits; the index torch.argmax gives)
        logits = logits.float()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        logits = logits / temperature
        if top_k is not None and 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and 0 < top_p < 1:
            sorted_logits, idx = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


def save_tokenizer(tokenizer, folder: str | os.PathLike, special_ids: dict[str, int | None] | None = None) -> str:
    """Write ``tokenizer`` next to a saved model so the folder is self-contained: ``tokenizer.json`` (for
    ``zoo generate`` and the ``tokenizers`` library) plus, when transformers is installed, ``tokenizer_config.json``
    so ``AutoTokenizer`` / ``pipeline("text-generation", model=folder)`` load it. ``special_ids`` (``pad_token_id``,
    ``bos_token_id``, ``eos_token_id``: the model config's) name its special tokens. A transformers tokenizer is saved
    with its own ``save_pretrained``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return folder
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - the lm extra is not installed: tokenizer.json only
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
        return folder
    names = {}
    for key, tid in (special_ids or {}).items():
        tok = tokenizer.id_to_token(tid) if tid is not None else None
        if tok is not None:
            names[key.replace("_id", "")] = tok
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(folder)
    return folder


def attach_folder_tokenizer(model: nn.Module, path: str | os.PathLike) -> None:
    """Set ``model.tokenizer`` from the ``tokenizer.json`` next to a checkpoint (file or folder), when there is one,
    so ``save_pretrained`` writes a self-contained folder again."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tok_file = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tok_file):
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - the lm extra is not installed
            return
        model.tokenizer = Tokenizer.from_file(tok_file)



# ---------------------------------------------------------------------------------------------- transformers classes


def _as_hybrid_cache(cache: Any, config: HybridConfig) -> Any:
    """Our cache as given; an *empty* transformers cache (e.g. ``DynamicCache()`` or ``StaticCache``) is replaced by
    the matching hybrid cache; a filled foreign one cannot be continued and is an error."""
    if cache is None or isinstance(cache, _HybridCacheState):
        return cache
    dynamic, static = _cache_classes()
    if type(cache).__name__ in ("DynamicCache", "StaticCache") and cache.get_seq_length() == 0:
        if type(cache).__name__ == "StaticCache":
            return static(config, max_cache_len=max(layer.max_cache_len for layer in cache.layers))
        return dynamic(config)
    raise TypeError(
        f"hybrid models keep conv windows next to the KV cache, so a {type(cache).__name__} holding "
        f"{cache.get_seq_length() if hasattr(cache, 'get_seq_length') else '?'} positions cannot be continued: pass "
        f"the cache the model returned (outputs.cache, a HybridCache), an empty DynamicCache/StaticCache, or none"
    )


_HF_CLASSES: dict[str, dict[str, type]] = {}


def hf_model_classes(prefix: str, config_class: type, to_hybrid_config: Callable[[Any], HybridConfig]) -> dict[str, type]:
    """transformers classes of a hybrid family, built once per ``prefix`` (transformers is imported here, not at
    ``import zoo``): ``{prefix}PreTrainedModel``, ``{prefix}Model`` (base model returning hidden states, the
    ``Lfm2Model`` equivalent) and ``{prefix}ForCausalLM``. ``to_hybrid_config`` maps the family's transformers
    config to a :class:`HybridConfig`. Module and parameter names are those of :class:`HybridLM`.

    What they provide, like transformers' own causal LMs: the loss with ``num_items_in_batch`` / ``shift_labels``
    (``Trainer`` gradient accumulation), any padding side and packed ``position_ids`` in training forwards,
    ``output_hidden_states`` / ``output_attentions`` / ``return_dict``, activation checkpointing, ``generate()`` with a
    :class:`HybridCache` (a transformers ``Cache``: continuation, assisted and prompt-lookup decoding, beam search,
    ``cache_implementation="static"``), ``inputs_embeds`` generation. No tensor-parallel plan is declared.
    """
    if prefix in _HF_CLASSES:
        return _HF_CLASSES[prefix]
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    dynamic_cache, static_cache = _cache_classes()

    class HybridPreTrainedModel(PreTrainedModel):
        config_class = None  # set below
        base_model_prefix = "model"
        supports_gradient_checkpointing = True
        _no_split_modules = ["DecoderLayer"]
        _supports_sdpa = True
        _can_compile_fullgraph = False
        main_input_name = "input_ids"
        _tp_plan = None  # no tensor-parallel plan: the config declares none either
        _pp_plan = None

        def _init_weights(self, module):
            std = self.config.initializer_range
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None and module.weight.device.type != "meta":
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

        def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint,
                                        every_n_layers: int = 1):
            layers = [m for m in self.modules() if isinstance(m, DecoderLayer)]
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = bool(enable) and i % every_n_layers == 0
                layer._gradient_checkpointing_func = gradient_checkpointing_func if enable else None

    class HybridModel(HybridPreTrainedModel):
        """The decoder (embeddings, layers, final norm) returning hidden states, like transformers' ``Lfm2Model``."""

        def __init__(self, config):
            super().__init__(config)
            self.hybrid_config = to_hybrid_config(config)
            build_decoder_modules(self, self.hybrid_config)
            self.post_init()

        def get_input_embeddings(self):
            return self.embed_tokens

        def set_input_embeddings(self, value):
            self.embed_tokens = value

        def forward(
            self,
            input_ids: torch.LongTensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            cache: Any = None,
            inputs_embeds: torch.Tensor | None = None,
            use_cache: bool | None = None,
            output_hidden_states: bool | None = None,
            output_attentions: bool | None = None,
            return_dict: bool | None = None,
            past_key_values: Any = None,
            **kwargs: Any,
        ):
            _reject_unknown(kwargs, type(self).__name__)
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids or inputs_embeds")
            cfg = self.config
            cache = _as_hybrid_cache(cache if cache is not None else past_key_values, self.hybrid_config)
            use_cache = cfg.use_cache if use_cache is None else use_cache
            if use_cache and cache is None and not self.training:
                cache = dynamic_cache(self.hybrid_config)
            output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
            output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
            return_dict = getattr(cfg, "return_dict", True) if return_dict is None else return_dict
            if inputs_embeds is None:
                if input_ids.is_floating_point():
                    raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
                inputs_embeds = self.embed_tokens(input_ids)
            ids_like = input_ids if input_ids is not None else inputs_embeds[..., 0]
            ctx = build_context(cfg.max_position_embeddings, ids_like, attention_mask, position_ids, cache,
                                output_attentions=bool(output_attentions))
            hidden: list | None = [] if output_hidden_states else None
            h = run_decoder(self, inputs_embeds, ctx, hidden)
            out = BaseModelOutputWithPast(
                last_hidden_state=h,
                cache=cache if use_cache else None,
                hidden_states=tuple(hidden) if hidden is not None else None,
                attentions=tuple(ctx.attentions) if ctx.attentions is not None else None,
            )
            return out if return_dict else out.to_tuple()

    class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
        """Causal LM head over the base model; ``lm_head`` is tied to ``model.embed_tokens`` (not a module) unless the
        config unties it."""

        accepts_loss_kwargs = True  # Trainer passes num_items_in_batch, which the loss honours

        def __init__(self, config):
            super().__init__(config)
            self.model = HybridModel(config)
            self.hybrid_config = self.model.hybrid_config
            self.lm_head = (
                None if self.hybrid_config.tie_word_embeddings
                else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            )
            self.post_init()

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def set_input_embeddings(self, value):
            self.model.embed_tokens = value

        def get_output_embeddings(self):
            return self.lm_head

        def get_decoder(self):
            return self.model

        def forward(
            self,
            input_ids: torch.LongTensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            cache: Any = None,
            inputs_embeds: torch.Tensor | None = None,
            labels: torch.LongTensor | None = None,
            use_cache: bool | None = None,
            logits_to_keep: int | torch.Tensor = 0,
            output_hidden_states: bool | None = None,
            output_attentions: bool | None = None,
            return_dict: bool | None = None,
            past_key_values: Any = None,
            shift_labels: torch.LongTensor | None = None,
            num_items_in_batch: torch.Tensor | int | None = None,
            ignore_index: int = -100,
            **kwargs: Any,
        ):
            _reject_unknown(kwargs, type(self).__name__)
            return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True,
            )
            h = out.last_hidden_state
            if isinstance(logits_to_keep, int):
                h = h[:, -logits_to_keep:] if logits_to_keep else h
            else:
                h = h[:, logits_to_keep]
            head = self.lm_head if self.lm_head is not None else self.model.embed_tokens
            logits = linear(h, head.weight, getattr(head, "bias", None) if self.lm_head is not None else None)
            loss = None
            if labels is not None or shift_labels is not None:
                loss = causal_lm_loss(logits, labels, shift_labels=shift_labels,
                                      num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)
            res = CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                         hidden_states=out.hidden_states, attentions=out.attentions)
            return res if return_dict else res.to_tuple()

        def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                          max_cache_length, *args, **kwargs):
            impl = generation_config.cache_implementation
            user = model_kwargs.get("cache")
            if user is None:
                user = model_kwargs.pop("past_key_values", None)
            if user is not None:
                if impl is not None:
                    raise ValueError("pass either cache_implementation or a cache object to generate(), not both")
                model_kwargs["cache"] = _as_hybrid_cache(user, self.hybrid_config)
                model_kwargs["cache"]._is_user_defined = True
                return
            if generation_config.use_cache is False:
                return
            if impl in (None, "dynamic"):
                cache = dynamic_cache(self.hybrid_config, max_cache_length)
            elif impl == "static":
                n = max(max_cache_length, generation_config.max_cache_len or 0)
                cache = static_cache(self.hybrid_config, max_cache_len=n)
            else:
                raise ValueError(
                    f"cache_implementation={impl!r} is not available for hybrid (conv + attention) models: use "
                    f"'dynamic' (default) or 'static'"
                )
            if generation_config.is_assistant:
                cache.activate_past_recording()  # the assistant's drafts are rolled back after verification
            model_kwargs["cache"] = cache

        def to_zoo(self) -> HybridLM:
            """The pure-PyTorch :class:`HybridLM` sharing this model's weights."""
            m = HybridLM.__new__(HybridLM)
            nn.Module.__init__(m)
            m.config = self.hybrid_config
            m.model = HybridDecoder.__new__(HybridDecoder)
            nn.Module.__init__(m.model)
            m.model.config = self.hybrid_config
            m.model.embed_tokens, m.model.layers = self.model.embed_tokens, self.model.layers
            m.model.embedding_norm = self.model.embedding_norm
            m.lm_head = self.lm_head
            m.num_features = m.head_hidden_size = self.hybrid_config.hidden_size
            m.vocab_size = self.hybrid_config.vocab_size
            return m.train(self.training)

    classes = {}
    for suffix, cls in (("PreTrainedModel", HybridPreTrainedModel), ("Model", HybridModel),
                        ("ForCausalLM", HybridForCausalLM)):
        cls.__name__ = cls.__qualname__ = prefix + suffix
        cls.config_class = config_class
        classes[prefix + suffix] = cls
    _HF_CLASSES[prefix] = classes
    return classes


# transformers forwards these generation / attention-backend keywords to every forward; they change nothing here
_HARMLESS_KWARGS = {"cache_position", "output_router_logits", "is_causal"}


def _reject_unknown(kwargs: dict, where: str) -> None:
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS_KWARGS and v is not None)
    if unknown:
        raise TypeError(f"{where}.forward() got unsupported argument(s) {unknown}")


# ---------------------------------------------------------------------------------------------- int8 weights


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: (int8 [N, K], fp32 scale [N])."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
    return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


def _program_scale(prog: StepProgram, owner: nn.Module, scale: torch.Tensor, watched: torch.Tensor | None = None):
    """:func:`_scale_in` for a program: a converted copy is recorded again once ``watched`` (default ``scale``; the
    child's own buffer where ``scale`` is a packed view) is edited in place (they share one version counter)."""
    out = _scale_in(owner, scale, prog.dtype)
    if out is not scale:
        prog.watch_version(scale if watched is None else watched)
    return out


def _scale_in(owner: nn.Module, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale.to(dtype)`` (what the int8 kernels take), kept on ``owner`` until the scale tensor changes."""
    if scale.dtype is dtype:
        return scale
    version = None if scale.is_inference() else scale._version  # (made under inference_mode: no version kept)
    key = (scale.data_ptr(), version, scale.shape[0], dtype)
    memo = owner.__dict__.get("_zoo_scale")
    if memo is None or memo[0] != key:
        memo = owner.__dict__["_zoo_scale"] = (key, scale.to(dtype))
    return memo[1]


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer (per-output-channel scales): single rows on the streaming kernel of
    :mod:`zoo.layers.gemv`, larger inputs on PyTorch's ``_weight_int8pack_mm``.

    Activations stay in their floating dtype (bf16 is the fast path of that kernel on CPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, s = _int8_rows(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.qweight, _scale_in(self, self.scale, x.dtype))
        return y + self.bias if self.bias is not None else y


class Int8Embedding(nn.Module):
    """int8 token embedding that doubles as the tied output head (rows dequantized on lookup)."""

    def __init__(self, emb: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        q, s = _int8_rows(emb.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.dtype = dtype
        self.padding_idx = emb.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scale[ids, None].to(self.dtype)

    def as_head(self, h: torch.Tensor) -> torch.Tensor:
        return int8_linear(h, self.qweight, _scale_in(self, self.scale, h.dtype))


@torch.no_grad()
def quantize_int8_(model: HybridLM, dtype: torch.dtype = torch.bfloat16) -> HybridLM:
    """In place: every ``nn.Linear`` and the (tied) embedding/head become weight-only int8, the rest ``dtype``.

    A serving path (a quarter of the fp32 weight bytes per decoded token); it cannot be trained or saved in the
    HF layout. Needs ``torch.ops.aten._weight_int8pack_mm`` (PyTorch >= 2.4 CPU builds)."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise RuntimeError("this PyTorch build has no _weight_int8pack_mm kernel; int8 weights are unavailable")
    model.to(dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    if model.lm_head is None:
        model.model.embed_tokens = Int8Embedding(model.model.embed_tokens, dtype)
    return model.eval()
