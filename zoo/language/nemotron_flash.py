"""Nemotron-Flash (Fu et al., "Nemotron-Flash: Towards Latency-Optimal Hybrid Small Language Models", arXiv
2511.18890, NeurIPS 2025): hybrid small LMs interleaving DeltaNet, Mamba2 and attention mixers with FFN layers of
their own, learned meta tokens prepended at prefill, and logits divided by the LM head's row norms.

The decoder is the shared :class:`zoo.language.hybrid.HybridLM`: every release layer token is one operator
(``deltanet`` -> :class:`zoo.layers.recurrent_mixers.DeltaNet`, ``m2`` / ``m`` -> ``Mamba2``, ``f`` -> ``FFNOnly``,
``a`` -> :class:`NemotronFlashAttention`) and mixer layers carry no FFN (``intermediate_size=0``), exactly like the
release (``"intermediate_size": 0``, FFN width ``int(ffn_expand_ratio * hidden) // 128 * 128``). The whole model is
pure PyTorch (CPU and GPU); decoding keeps every state in one :class:`HybridCache` (recurrent states, conv windows,
KV buffers), so ``generate()`` runs with a cache, unlike the release's remote code.

This file holds what is Nemotron-Flash-specific: the layer-pattern parser, the released configurations, meta tokens,
logit normalisation, weight normalisation (training option), checkpoint conversion from the release layout
(``model.layers.N.{gla,mamba,self_attn,ffn}``, ``input_layernorm`` / ``pre_ffn_layernorm``, ``final_layernorm``),
registrations, and the transformers integration (``ZooNemotronFlashConfig`` / ``ZooNemotronFlashForCausalLM``, model
type ``zoo_nemotron_flash``, registered with ``AutoConfig`` / ``AutoModelForCausalLM``; built on first use so
``import zoo`` does not import transformers).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.language.hybrid import (
    OPERATORS, ContextLengthError, GQAttention, HybridConfig, HybridLM, RMSNorm, attach_folder_tokenizer,
    build_context, causal_lm_loss,
    hf_model_classes, register_operator,
)
from zoo.layers.recurrent_mixers import mamba2_dims  # noqa: F401  (registers deltanet / mamba2 / ffn)
from zoo.registry import CheckpointSource, ModelCfg, register_model

log = logging.getLogger(__name__)

__all__ = [
    "NemotronFlashLM", "NemotronFlashAttention", "parse_layer_pattern", "hybrid_config_from_nemotron_flash",
    "nemotron_flash_config_dict", "checkpoint_filter_fn", "load_pretrained", "register_transformers",
    "weight_normalize_", "NEMOTRON_FLASH_CONFIGS", "LAYER_TOKENS", "to_transformers", "with_meta_tokens",
]

# release layer token -> registered operator
LAYER_TOKENS = {"deltanet": "deltanet", "m2": "mamba2", "m": "mamba2", "a": "nf_attention", "f": "ffn"}


@register_operator("nf_attention")
class NemotronFlashAttention(GQAttention):
    """Nemotron-Flash attention: GQA with RoPE (default or NTK-scaled base), no q/k norm unless ``kq_norm="rms"``;
    the hybrid :class:`GQAttention` with ``o_proj`` renamed (the converter maps it to ``out_proj``)."""

    module_name = "self_attn"

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        x = config.extra
        if not x.get("rope", True):
            raise ValueError("Nemotron-Flash attention without RoPE (rope=False) is not supported by the zoo port")
        if x.get("kq_norm", "none") in (None, "none"):
            self.q_layernorm = nn.Identity()
            self.k_layernorm = nn.Identity()
        elif x["kq_norm"] == "rms":
            self.q_layernorm = RMSNorm(self.head_dim, 1e-6)
            self.k_layernorm = RMSNorm(self.head_dim, 1e-6)
        else:
            raise ValueError(f"kq_norm={x['kq_norm']!r} is not supported (use 'none' or 'rms')")
        self.rope_theta = rope_base(config)


def rope_base(config: HybridConfig) -> float:
    """RoPE base; ``rope_type="ntk"`` scales it like the release: ``base * (2 max / orig_max - 1) ** (d / (d-2))``."""
    x = config.extra
    base = float(config.rope_theta)
    kind = x.get("rope_type") or "default"
    if kind == "ntk":
        orig = x.get("orig_max_position_embeddings")
        if not orig:
            raise ValueError("rope_type='ntk' needs orig_max_position_embeddings")
        d = config.attn_head_dim
        base = base * ((2 * config.max_position_embeddings / orig) - 1) ** (d / (d - 2))
    elif kind != "default":
        raise ValueError(f"rope_type={kind!r} is not supported by the zoo Nemotron-Flash port ('default' or 'ntk')")
    return base


# ---------------------------------------------------------------------------------------------- configs

_3B_PATTERN = " ".join(["deltanet f m2 f a f m2 f"] * 3 + ["deltanet f m2 f deltanet f m2 f deltanet f m2 f"])

# Released configurations, HF config.json keys. Where each value comes from: MODEL_CARD.md ("Nemotron-Flash").
NEMOTRON_FLASH_CONFIGS: dict[str, dict[str, Any]] = {
    "3b": dict(vocab_size=65536, hidden_size=3072, layer_types=_3B_PATTERN.split(), num_attention_heads=24,
               num_key_value_heads=6, intermediate_size=0, ffn_expand_ratio=3, mamba_d_state=128, mamba_expand=2,
               mamba2_headdim=64, mamba_d_conv=4, d_conv=4, num_memory_tokens=128, rms_norm_eps=1e-6, rope=True,
               rope_type="default", rope_theta=10000.0, max_position_embeddings=8192, kq_norm="none",
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # 1B: hidden 2048 and the 131072-entry vocabulary are sourced; the pattern, heads and the rest are assumed (the
    # 3B's first 24 entries, head dim 128): MODEL_CARD.md ("Shapes and where each value comes from")
    "1b": dict(vocab_size=131072, hidden_size=2048, layer_types=_3B_PATTERN.split()[:24], num_attention_heads=16,
               num_key_value_heads=4, intermediate_size=0, ffn_expand_ratio=3, mamba_d_state=128, mamba_expand=2,
               mamba2_headdim=64, mamba_d_conv=4, d_conv=4, num_memory_tokens=128, rms_norm_eps=1e-6, rope=True,
               rope_type="default", rope_theta=10000.0, max_position_embeddings=8192, kq_norm="none",
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def parse_layer_pattern(pattern: str | Sequence[str]) -> tuple[str, ...]:
    """Release layer tokens (a list, or a string like ``"deltanet f m2 f a f"``, spaces / commas / ``|`` between
    them) -> registered operator names. Names that are already operators pass through."""
    tokens = pattern.replace(",", " ").replace("|", " ").split() if isinstance(pattern, str) else list(pattern)
    if not tokens:
        raise ValueError("the Nemotron-Flash layer pattern is empty")
    out = []
    for i, tok in enumerate(tokens):
        op = LAYER_TOKENS.get(tok, tok if tok in OPERATORS else None)
        if op is None:
            raise ValueError(
                f"unknown operator {tok!r} at position {i} of the layer pattern; Nemotron-Flash tokens are "
                f"{sorted(LAYER_TOKENS)} (or a registered operator: {sorted(OPERATORS)})"
            )
        out.append(op)
    return tuple(out)


def ffn_width(hidden_size: int, ffn_expand_ratio: float) -> int:
    """The release rule: ``int(ratio * hidden) // 128 * 128`` (3 x 3072 -> 9216)."""
    return int(ffn_expand_ratio * hidden_size) // 128 * 128


def hybrid_config_from_nemotron_flash(cfg: Mapping[str, Any] | None = None, **overrides: Any) -> HybridConfig:
    """A :class:`HybridConfig` from Nemotron-Flash settings (a release / our ``config.json`` dict and/or keywords)."""
    d = {**dict(cfg or {}), **overrides}
    pattern = d.get("layer_pattern") or d.get("layer_types")
    if pattern is None:
        raise ValueError("a Nemotron-Flash config needs layer_types (the release layer pattern)")
    layer_types = parse_layer_pattern(pattern)
    if d.get("num_hidden_layers") not in (None, len(layer_types)):
        raise ValueError(f"num_hidden_layers={d['num_hidden_layers']} but the layer pattern has {len(layer_types)}")
    if int(d.get("intermediate_size", 0) or 0):
        raise ValueError("mixer layers with an FFN of their own (intermediate_size > 0) are not part of the released "
                         "Nemotron-Flash models; use 'f' layers")
    hidden = int(d.get("hidden_size", 3072))
    heads = int(d.get("num_attention_heads", 24))
    kv = int(d.get("num_key_value_heads") or heads)
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    ffn = d.get("ffn_size") or ffn_width(hidden, float(d.get("ffn_expand_ratio") or 3))
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    extra = dict(
        layer_pattern=" ".join(pattern) if not isinstance(pattern, str) else pattern,
        ffn_size=int(ffn), ffn_expand_ratio=d.get("ffn_expand_ratio"),
        num_memory_tokens=int(d.get("num_memory_tokens", 0) or 0),
        mamba_d_state=int(d.get("mamba_d_state", 128)), mamba_expand=d.get("mamba_expand", 2),
        mamba_d_inner=d.get("mamba_d_inner"), mamba_headdim=int(d.get("mamba2_headdim", d.get("mamba_headdim", 64))),
        mamba_ngroups=int(d.get("mamba_ngroups", 1)), mamba_d_conv=int(d.get("mamba_d_conv", 4)),
        mamba_conv_bias=bool(d.get("mamba_conv_bias", True)), mamba_proj_bias=bool(d.get("mamba_proj_bias", False)),
        mamba_chunk_size=int(d.get("mamba_chunk_size", 256)),
        deltanet_heads=heads, deltanet_conv=int(d.get("d_conv", 4)),
        deltanet_chunk_size=int(d.get("deltanet_chunk_size", 64)),
        rope=bool(d.get("rope", True)), rope_type=d.get("rope_type") or "default",
        orig_max_position_embeddings=d.get("orig_max_position_embeddings"), kq_norm=d.get("kq_norm") or "none",
        logit_norm=bool(d.get("logit_norm", True)),
    )
    return HybridConfig(
        vocab_size=int(d.get("vocab_size", 65536)), hidden_size=hidden, layer_types=layer_types, intermediate_size=0,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=d.get("head_dim"),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(d.get("rope_theta", 10000.0)),
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)), pad_token_id=d.get("pad_token_id", 0),
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=eos, extra=extra,
    )


def nemotron_flash_config_dict(config: HybridConfig, model_type: str = "zoo_nemotron_flash") -> dict[str, Any]:
    """``config.json`` content for ``config`` in the release's key names (read back by
    :func:`hybrid_config_from_nemotron_flash`, ``ZooNemotronFlashConfig`` and :func:`load_pretrained`)."""
    x = config.extra
    tokens = x.get("layer_pattern")
    tokens = tokens.replace("|", " ").split() if isinstance(tokens, str) else list(config.layer_types)
    out = {
        "architectures": ["ZooNemotronFlashForCausalLM"], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        # the release calls it layer_types; transformers >= 5 reserves that key for its own attention kinds
        "layer_pattern": tokens,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "intermediate_size": 0,
        "ffn_size": x["ffn_size"], "ffn_expand_ratio": x.get("ffn_expand_ratio"),
        "num_memory_tokens": x.get("num_memory_tokens", 0), "mamba_d_state": x["mamba_d_state"],
        "mamba_expand": x["mamba_expand"], "mamba_d_inner": x.get("mamba_d_inner"), "mamba2_headdim": x["mamba_headdim"],
        "mamba_ngroups": x["mamba_ngroups"], "mamba_d_conv": x["mamba_d_conv"], "mamba_conv_bias": x["mamba_conv_bias"],
        "mamba_proj_bias": x["mamba_proj_bias"], "mamba_chunk_size": x["mamba_chunk_size"], "d_conv": x["deltanet_conv"],
        "deltanet_chunk_size": x["deltanet_chunk_size"], "rms_norm_eps": config.norm_eps, "rope": x["rope"],
        "rope_type": x["rope_type"], "rope_theta": config.rope_theta,
        "orig_max_position_embeddings": x.get("orig_max_position_embeddings"), "kq_norm": x["kq_norm"],
        "logit_norm": x.get("logit_norm", True), "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }
    if config.head_dim:
        out["head_dim"] = config.head_dim
    return out


# ---------------------------------------------------------------------------------------------- meta tokens


def _leading_pads(mask: torch.Tensor | None, bsz: int, t: int, device) -> torch.Tensor:
    if mask is None:
        return torch.zeros(bsz, dtype=torch.long, device=device)
    m = mask.to(device).bool()
    return torch.where(m.any(1), m.long().argmax(1), torch.full_like(m[:, 0], t, dtype=torch.long))


def with_meta_tokens(memory: torch.Tensor | None, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, prefill: bool):
    """Prepend the meta tokens to a prefill (right before each row's first real token, so a left-padded row sees
    exactly what it sees alone) and fix mask / positions; at decode steps only shift positions and keep the new
    tokens' mask. Returns (embeds, mask, positions, strip) where ``strip(y)`` drops the meta positions again."""
    n = 0 if memory is None else memory.shape[0]
    if n == 0:
        return embeds, attention_mask, position_ids, lambda y: y
    bsz, t = embeds.shape[:2]
    if not prefill:
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, -t:]  # the cache remembers which past positions were padding
        if position_ids is not None:
            position_ids = position_ids + n
        return embeds, attention_mask, position_ids, lambda y: y
    dev = embeds.device
    p = _leading_pads(attention_mask, bsz, t, dev)[:, None]  # [B, 1]
    j = torch.arange(n + t, device=dev)[None]
    # new layout per row: p pads, n meta tokens, the rest; src indexes cat([meta, original])
    src = torch.where(j < p, n + j, torch.where(j < p + n, j - p, j))
    full = torch.cat([memory.to(embeds.dtype)[None].expand(bsz, -1, -1), embeds], 1)
    embeds = full.gather(1, src[..., None].expand(-1, -1, full.shape[-1]))
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(bsz, n), attention_mask.to(dev)], 1).gather(1, src)
    if position_ids is not None:
        pos = position_ids.to(dev).expand(bsz, t)
        position_ids = torch.cat([torch.arange(n, device=dev).expand(bsz, n), pos + n], 1).gather(1, src)
    back = torch.arange(t, device=dev)[None]
    back = torch.where(back < p, back, back + n)  # original position -> new position

    def strip(y: torch.Tensor) -> torch.Tensor:
        if y is None or y.ndim < 2 or y.shape[1] != n + t:
            return y
        return y.gather(1, back.expand(bsz, -1).view(bsz, t, *([1] * (y.ndim - 2))).expand(-1, -1, *y.shape[2:]))

    return embeds, attention_mask, position_ids, strip


def head_row_norms(head: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``||lm_head.weight[v]||`` for every vocab row v, in ``dtype``. Outside autograd they are kept on the head until
    its weight changes (address or in-place version): recomputing them read the whole head again at every decoded
    token (69 of 85 ms per token for a 32k x 1024 bf16 head on this machine)."""
    w = head.weight
    if torch.is_grad_enabled() and w.requires_grad:
        return w.float().norm(dim=1).to(dtype).clamp_min(1e-12)
    key = (w.data_ptr(), None if w.is_inference() else w._version, w.shape, dtype)  # (inference tensors: no version)
    memo = head.__dict__.get("_zoo_row_norms")
    if memo is None or memo[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor: autograd may use it later
            memo = head.__dict__["_zoo_row_norms"] = (key, w.float().norm(dim=1).to(dtype).clamp_min(1e-12))
    return memo[1]


def normalized_logits(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """``lm_head(h) / ||lm_head.weight[v]||`` for every vocab row v (the release's logit normalisation)."""
    return head(h) / head_row_norms(head, h.dtype)


# ---------------------------------------------------------------------------------------------- model


class NemotronFlashLM(HybridLM):
    """Nemotron-Flash causal LM. Keyword arguments use the release's config.json names (``layer_types`` as the
    release pattern, ``num_memory_tokens``, ``ffn_expand_ratio``, ``mamba_d_state``, ...); ``config=`` takes a ready
    :class:`HybridConfig`."""

    def __init__(self, config: HybridConfig | None = None, **kwargs: Any):
        for bad in ("num_classes", "in_chans"):
            if kwargs.get(bad) is not None:
                raise TypeError(f"{bad} does not apply to a language model; use vocab_size= to change the output size")
            kwargs.pop(bad, None)
        kwargs.pop("deploy", None)
        if config is None:
            config = hybrid_config_from_nemotron_flash(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        super().__init__(config)
        n = int(config.extra.get("num_memory_tokens", 0) or 0)
        if n:
            self.model.memory_tokens = nn.Parameter(torch.randn(n, config.hidden_size))

    @property
    def num_memory_tokens(self) -> int:
        mem = getattr(self.model, "memory_tokens", None)
        return 0 if mem is None else mem.shape[0]

    def forward_features(self, input_ids, attention_mask=None, cache=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            inputs_embeds = self.model.embed_tokens(input_ids)
        prefill = cache is None or cache.seen == 0
        n, t = self.num_memory_tokens, inputs_embeds.shape[1]
        if prefill and n + t > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"prompt of {t} tokens + {n} meta tokens exceeds the model's context max_position_embeddings="
                f"{self.config.max_position_embeddings}; shorten the prompt to at most "
                f"{self.config.max_position_embeddings - n} tokens"
            )
        emb, mask, pos, strip = with_meta_tokens(getattr(self.model, "memory_tokens", None), inputs_embeds,
                                                 attention_mask, position_ids, prefill)
        ctx = build_context(self.config.max_position_embeddings, emb[..., 0], mask, pos, cache)
        return strip(self.model(emb, ctx))

    def forward_head(self, hidden: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits or self.lm_head is None or not self.config.extra.get("logit_norm", True):
            return super().forward_head(hidden, pre_logits)
        return normalized_logits(hidden, self.lm_head)

    def generate(self, input_ids: torch.Tensor, *args: Any, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        t = input_ids.shape[-1]
        n, ctx_len = self.num_memory_tokens, self.config.max_position_embeddings
        if t + n > ctx_len:
            raise ContextLengthError(
                f"prompt of {t} tokens + {n} meta tokens is longer than the model's context "
                f"max_position_embeddings={ctx_len}; shorten the prompt to at most {ctx_len - n} tokens"
            )
        if t + n + max_new_tokens > ctx_len:
            raise ContextLengthError(
                f"prompt of {t} tokens + {n} meta tokens + max_new_tokens={max_new_tokens} exceeds "
                f"max_position_embeddings={ctx_len}; lower max_new_tokens to at most {ctx_len - n - t}"
            )
        return super().generate(input_ids, *args, max_new_tokens=max_new_tokens, **kwargs)

    def new_cache(self, max_length: int = 0, static: bool = False):
        return super().new_cache(max_length + self.num_memory_tokens if max_length else 0, static)

    def normalize_weights_(self) -> "NemotronFlashLM":
        return weight_normalize_(self)

    # --------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None,
                        tokenizer: Any = None) -> Path:
        """``config.json`` (release key names, model type ``zoo_nemotron_flash``) + ``model.safetensors`` (our
        keys), plus the tokenizer: loadable by :func:`load_pretrained`, ``ZooNemotronFlashForCausalLM`` and
        ``AutoModelForCausalLM`` (after :func:`register_transformers`)."""
        from zoo.checkpoints import save_file
        from zoo.language.hybrid import save_tokenizer

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(nemotron_flash_config_dict(self.config), indent=2) + "\n")
        sd = {k: v.contiguous() for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        if tokenizer is not None:
            c = self.config
            save_tokenizer(tokenizer, out, {"pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
                                            "eos_token_id": c.eos_token_id})
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides: Any):
        return load_pretrained(path, dtype=dtype, **overrides)


# Linear layers that write to the residual stream ([hidden, in]): their hidden-space vectors are the columns.
_WRITES_RESIDUAL = ("o_proj", "out_proj", "w2", "down_proj")


@torch.no_grad()
def weight_normalize_(model: nn.Module) -> nn.Module:
    """Weight normalisation (training option, applied once before training and after every optimizer step): every
    weight vector that lives in the hidden (residual-stream) space is projected onto the unit sphere -- the rows of
    the token embedding, of the LM head and of every ``nn.Linear`` that reads the residual stream (q/k/v/b/in_proj,
    gate/up: ``[out, hidden]``), and the columns of every one that writes to it (o_proj/out_proj/down: ``[hidden,
    in]``, told apart by name so square matrices are not ambiguous). This is the matrix rule of NVIDIA's nGPT
    reference code (``normalize_matrices``: embedding, q/k/v, fc and lm_head along the embedding dimension, the two
    output projections along it too), the closest published formulation from the same lab; the Nemotron-Flash paper's
    own rule could not be read (MODEL_CARD.md, "Weight normalisation", states what the code evidence is)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, (nn.Linear, nn.Embedding)) or w is None or w.device.type == "meta" or w.ndim != 2:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) and leaf in _WRITES_RESIDUAL and w.shape[0] == hidden:
            dim = 0
        elif w.shape[1] == hidden:
            dim = 1
        elif w.shape[0] == hidden:
            dim = 0
        else:
            continue
        w.div_(w.float().norm(dim=dim, keepdim=True).clamp_min(1e-12).to(w.dtype))
    return model


# ---------------------------------------------------------------------------------------------- conversion


def _release_key(k: str, layer_types: Sequence[str]) -> str:
    """One release (or our) key -> our key."""
    if not k.startswith("model.") and k != "lm_head.weight":
        k = "model." + k
    k = k.replace("model.final_layernorm.", "model.embedding_norm.")
    parts = k.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        rest = ".".join(parts[3:])
        rest = rest.replace("input_layernorm.", "operator_norm.").replace("pre_ffn_layernorm.", "operator_norm.")
        rest = (rest.replace("ffn.gate_proj.", "ffn.w1.").replace("ffn.up_proj.", "ffn.w3.")
                .replace("ffn.down_proj.", "ffn.w2.").replace("self_attn.o_proj.", "self_attn.out_proj.")
                .replace("self_attn.q_norm.", "self_attn.q_layernorm.").replace("self_attn.k_norm.",
                                                                             "self_attn.k_layernorm."))
        k = ".".join(parts[:3] + [rest])
    return k


def check_mamba_shapes(state_dict: Mapping[str, torch.Tensor], config: HybridConfig) -> None:
    """A checkpoint whose Mamba2 tensors contradict the config is an error that names both (not a silent reshape)."""
    dims = mamba2_dims(config)
    want = {"in_proj.weight": (dims["in_proj"], config.hidden_size), "conv1d.weight": (dims["conv_dim"], 1,
            int(config.extra.get("mamba_d_conv", 4))), "A_log": (dims["nheads"],), "D": (dims["nheads"],),
            "dt_bias": (dims["nheads"],), "norm.weight": (dims["d_inner"],),
            "out_proj.weight": (config.hidden_size, dims["d_inner"])}
    for k, v in state_dict.items():
        if ".mamba." not in k:
            continue
        suffix = k.split(".mamba.", 1)[1]
        if suffix in want and tuple(v.shape) != want[suffix]:
            x = config.extra
            raise ValueError(
                f"checkpoint tensor {k} has shape {tuple(v.shape)} but the config gives {want[suffix]} "
                f"(hidden_size={config.hidden_size}, mamba_expand={x.get('mamba_expand')}, mamba_d_state="
                f"{dims['d_state']}, mamba2_headdim={dims['headdim']}, mamba_ngroups={dims['ngroups']} -> d_inner="
                f"{dims['d_inner']}, {dims['nheads']} heads, conv channels {dims['conv_dim']}, in_proj "
                f"{dims['in_proj']}): fix the config (e.g. mamba_d_state / mamba_expand / mamba_d_inner) to match "
                f"the checkpoint"
            )


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Release layout (``gla`` / ``mamba`` / ``self_attn.o_proj`` / ``ffn.gate_proj`` / ``input_layernorm`` /
    ``pre_ffn_layernorm`` / ``final_layernorm``) or ours -> ours; drops RoPE tables, casts to the model's dtype and
    checks the Mamba2 shapes against the model's config."""
    cfg = model.config
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith("inv_freq"):
            continue
        out[_release_key(k, cfg.layer_types)] = v
    check_mamba_shapes(out, cfg)
    for k, v in out.items():
        ref = own.get(k)
        if ref is not None and v.is_floating_point() and v.dtype != ref.dtype:
            out[k] = v.to(ref.dtype)
    return out


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: a Nemotron-Flash checkpoint folder needs config.json next to "
                                f"its *.safetensors (Hugging Face layout)")
    d = json.loads(cfg_file.read_text())
    mt = d.get("model_type")
    if mt not in (None, "nemotron_flash", "zoo_nemotron_flash"):
        raise ValueError(f"{cfg_file} describes a {mt!r} model, not Nemotron-Flash (model_type 'nemotron_flash')")
    return d


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    **overrides: Any) -> NemotronFlashLM:
    """A :class:`NemotronFlashLM` from a release folder (``nvidia/Nemotron-Flash-*``: config.json + sharded
    safetensors) or one we saved, in eval mode; built on ``meta`` and the tensors assigned (one copy of the weights);
    a ``tokenizer.json`` next to them is attached as ``model.tokenizer``."""
    from safetensors import safe_open

    from zoo.checkpoints import CheckpointError, is_shard_index, load_weights, shard_files

    path = Path(path)
    cfg = hybrid_config_from_nemotron_flash(_read_config(path), **overrides)
    index = path / "model.safetensors.index.json" if path.is_dir() else path
    if is_shard_index(index) and index.is_file():  # a sharded release: exactly the shards its index lists
        files = [index.parent / f for f in shard_files(index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} listed in {index} is missing (expected at "
                                  f"{index.parent / missing[0]}); download the folder again")
    else:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    with torch.device("meta"):
        model = NemotronFlashLM(config=cfg).to(dtype or torch.get_default_dtype())
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    load_weights(model, checkpoint_filter_fn(sd, model), context=f"nemotron_flash <- {path}", assign=True)
    attach_folder_tokenizer(model, path)
    return model.eval()


# ---------------------------------------------------------------------------------------------- registry


def _cfg(hub_id: str | None = None, filename: str = "model.safetensors", **kw) -> ModelCfg:
    return ModelCfg(
        task="text-generation", family="nemotron_flash", paper="2511.18890", license="cc-by-nc-4.0",
        num_classes=kw.pop("num_classes", 65536), input_size=(), pool_size=None, crop_pct=1.0, interpolation="",
        mean=(), std=(), first_conv=None, classifier=None,
        source=CheckpointSource(hf_hub_id=hub_id, hf_filename=filename, layout="hf") if hub_id else None,
        notes="NVIDIA Nemotron-Flash weights (bf16, remote-code release); converted from the release layout"
        + (" (sharded: the index and every shard are fetched)" if filename.endswith(".index.json") else "")
        + ". No sha256 pinned: the hub revision is trusted." if hub_id else "",
        **kw,
    )


load_on_meta = True

default_cfgs = {
    # the 1B repository holds one model.safetensors (its upload commit lists that file); the 3B ones are two shards
    # plus model.safetensors.index.json (the -3B-Instruct file listing)
    "nemotron_flash_1b.nvidia": _cfg("nvidia/Nemotron-Flash-1B", num_classes=131072),
    "nemotron_flash_3b.nvidia": _cfg("nvidia/Nemotron-Flash-3B", "model.safetensors.index.json"),
    "nemotron_flash_3b.nvidia_instruct": _cfg("nvidia/Nemotron-Flash-3B-Instruct", "model.safetensors.index.json"),
}


def _create(size: str, kwargs: dict[str, Any]) -> NemotronFlashLM:
    return NemotronFlashLM(**{**NEMOTRON_FLASH_CONFIGS[size], **kwargs})


@register_model
def nemotron_flash_1b(**kwargs) -> NemotronFlashLM:
    """Nemotron-Flash-1B: d=2048 and vocabulary 131072 as published; the layer pattern and head counts were not
    found and are assumed (MODEL_CARD.md): 24 layers (4 DeltaNet, 6 Mamba2, 2 attention mixers + 12 FFN 6144), 16
    heads / 4 KV heads, 128 meta tokens, untied head."""
    return _create("1b", kwargs)


@register_model
def nemotron_flash_3b(**kwargs) -> NemotronFlashLM:
    """Nemotron-Flash-3B: d=3072, 36 layers (6 DeltaNet, 9 Mamba2 (96 heads x 64, state 128), 3 attention mixers +
    18 FFN 9216), 128 meta tokens, untied head."""
    return _create("3b", kwargs)


# ---------------------------------------------------------------------------------------------- transformers

_HF: dict[str, Any] = {}


def register_transformers() -> tuple[type, type]:
    """Build ``ZooNemotronFlashConfig`` / ``ZooNemotronFlashForCausalLM`` (the shared hybrid transformers classes
    plus meta tokens and logit normalisation) and register them with ``AutoConfig`` / ``AutoModelForCausalLM``
    (idempotent). Returns the config and causal-LM classes."""
    if _HF:
        return _HF["ZooNemotronFlashConfig"], _HF["ZooNemotronFlashForCausalLM"]
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    defaults = nemotron_flash_config_dict(hybrid_config_from_nemotron_flash(NEMOTRON_FLASH_CONFIGS["3b"]))
    for k in ("architectures", "model_type"):
        defaults.pop(k)

    class ZooNemotronFlashConfig(PretrainedConfig):
        """transformers config of the zoo Nemotron-Flash port (the release's config.json keys; defaults: 3B)."""

        model_type = "zoo_nemotron_flash"
        base_model_tp_plan = None
        base_model_pp_plan = None

        def __init__(self, **kwargs: Any):
            if "layer_types" in kwargs:  # the release's name for the pattern
                kwargs["layer_pattern"] = kwargs.pop("layer_types")
            special = {k: kwargs.pop(k, defaults[k]) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                             "tie_word_embeddings")}
            for k, v in defaults.items():
                if k not in special:
                    setattr(self, k, kwargs.pop(k, v))
            self.num_hidden_layers = len(self.layer_pattern)
            self.use_cache = kwargs.pop("use_cache", True)
            kwargs.pop("num_hidden_layers", None)
            super().__init__(**special, **kwargs)

    to_hybrid = lambda c: hybrid_config_from_nemotron_flash(  # noqa: E731
        {k: getattr(c, k) for k in defaults if hasattr(c, k)}
        | {k: getattr(c, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")})
    base = hf_model_classes("ZooNemotronFlash", ZooNemotronFlashConfig, to_hybrid)
    Base = base["ZooNemotronFlashForCausalLM"]

    class ZooNemotronFlashForCausalLM(Base):
        """transformers causal LM of the zoo Nemotron-Flash port: meta tokens at prefill, logits divided by the head's
        row norms, ``generate()`` with the hybrid cache (recurrent states + KV)."""

        def __init__(self, config):
            super().__init__(config)
            n = int(self.hybrid_config.extra.get("num_memory_tokens", 0) or 0)
            if n:
                self.model.memory_tokens = nn.Parameter(torch.randn(n, config.hidden_size))

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None,
                    output_attentions=None, return_dict=None, past_key_values=None, shift_labels=None,
                    num_items_in_batch=None, ignore_index=-100, **kwargs):
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids or inputs_embeds")
            if inputs_embeds is None:
                if input_ids.is_floating_point():
                    raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
                inputs_embeds = self.model.embed_tokens(input_ids)
            c = cache if cache is not None else past_key_values
            prefill = c is None or c.get_seq_length() == 0
            mem = getattr(self.model, "memory_tokens", None)
            n, t = (0 if mem is None else mem.shape[0]), inputs_embeds.shape[1]
            ctx_len = self.config.max_position_embeddings
            if prefill and n + t > ctx_len:
                raise ContextLengthError(
                    f"prompt of {t} tokens + {n} meta tokens exceeds the model's context max_position_embeddings="
                    f"{ctx_len}; shorten the prompt to at most {ctx_len - n} tokens")
            emb, mask, pos, strip = with_meta_tokens(mem, inputs_embeds, attention_mask, position_ids, prefill)
            keep = logits_to_keep  # the meta tokens sit before the prompt: the last k positions are real tokens
            out = super().forward(
                inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=cache,
                past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=keep,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True,
                **kwargs)
            logits = strip(out.logits)
            head = self.lm_head
            if head is not None and self.hybrid_config.extra.get("logit_norm", True):
                logits = logits / head_row_norms(head, logits.dtype)
            out.logits = logits
            if out.hidden_states is not None:
                out.hidden_states = tuple(strip(h) for h in out.hidden_states)
            if labels is not None or shift_labels is not None:
                out.loss = causal_lm_loss(logits, labels, shift_labels=shift_labels,
                                          num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)
            return out if (return_dict if return_dict is not None else getattr(self.config, "return_dict", True)) \
                else out.to_tuple()

        def to_zoo(self) -> NemotronFlashLM:
            """The pure-PyTorch :class:`NemotronFlashLM` sharing this model's weights."""
            m = NemotronFlashLM.__new__(NemotronFlashLM)
            nn.Module.__init__(m)
            z = super().to_zoo()
            m.config, m.model, m.lm_head = z.config, z.model, z.lm_head
            m.model.memory_tokens = getattr(self.model, "memory_tokens", None)
            m.num_features = m.head_hidden_size = z.num_features
            m.vocab_size = z.vocab_size
            return m.train(self.training)

    ZooNemotronFlashForCausalLM.__qualname__ = ZooNemotronFlashForCausalLM.__name__
    AutoConfig.register("zoo_nemotron_flash", ZooNemotronFlashConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZooNemotronFlashConfig, ZooNemotronFlashForCausalLM, exist_ok=True)
    for cls in (ZooNemotronFlashConfig, ZooNemotronFlashForCausalLM):
        cls.__module__ = __name__
    _HF.update(ZooNemotronFlashConfig=ZooNemotronFlashConfig, ZooNemotronFlashForCausalLM=ZooNemotronFlashForCausalLM)
    return ZooNemotronFlashConfig, ZooNemotronFlashForCausalLM


def to_transformers(model: NemotronFlashLM):
    """Wrap a zoo Nemotron-Flash model as ``ZooNemotronFlashForCausalLM`` sharing its weights (no copy)."""
    cfg_cls, model_cls = register_transformers()
    d = nemotron_flash_config_dict(model.config)
    d.pop("architectures")
    d.pop("model_type")
    with torch.device("meta"):
        hf = model_cls(cfg_cls(**d))
    hf.model.embed_tokens, hf.model.layers = model.model.embed_tokens, model.model.layers
    hf.model.embedding_norm = model.model.embedding_norm
    if getattr(model.model, "memory_tokens", None) is not None:
        hf.model.memory_tokens = model.model.memory_tokens
    hf.lm_head = model.lm_head
    return hf.train(model.training)


def __getattr__(name: str):
    if name in ("ZooNemotronFlashConfig", "ZooNemotronFlashForCausalLM"):
        register_transformers()
        return _HF[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
