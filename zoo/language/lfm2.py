"""LFM2 (Liquid AI, "LFM2 Technical Report", arXiv 2511.23404): hybrid gated-short-conv / GQA small language models.

The decoder itself is the config-driven :class:`zoo.language.hybrid.HybridLM`; this file holds what is LFM2-specific:
the published configs (350M / 700M / 1.2B / 2.6B), the FFN width rule, reading Hugging Face LFM2 configs of both
generations (``full_attn_idxs`` / ``block_*`` keys and ``layer_types``), checkpoint conversion, registrations, and the
transformers integration (``ZooLfm2Config`` / ``ZooLfm2ForCausalLM`` with model type ``zoo_lfm2``, registered with
``AutoConfig`` / ``AutoModelForCausalLM``).

The transformers classes are built on first use so ``import zoo`` does not import transformers::

    from zoo.language.lfm2 import ZooLfm2ForCausalLM      # builds and registers them
    model = ZooLfm2ForCausalLM.from_pretrained("path/to/LFM2-350M")   # an HF LFM2 folder or one we saved
    model.generate(ids, max_new_tokens=20, do_sample=True, top_p=0.9)

Key layout = transformers' ``Lfm2ForCausalLM`` (``model.layers.N.conv.in_proj.weight``, ...); the tied ``lm_head`` is
not stored.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from zoo.language.hybrid import HybridConfig, HybridLM, attach_folder_tokenizer, hf_model_classes
import zoo.layers.recurrent_mixers  # noqa: F401,E402  (registers deltanet / mamba2 / ffn for custom layer_types)
from zoo.registry import CheckpointSource, ModelCfg, register_model

log = logging.getLogger(__name__)

__all__ = [
    "Lfm2LM", "lfm2_ffn_width", "lfm2_layer_types", "hybrid_config_from_lfm2", "checkpoint_filter_fn",
    "load_pretrained", "register_transformers", "LFM2_CONFIGS",
]

# Published configs (HF config.json of each release; counts verified against the model cards).
LFM2_CONFIGS: dict[str, dict[str, Any]] = {
    "350m": dict(hidden_size=1024, num_hidden_layers=16, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                 num_attention_heads=16, num_key_value_heads=8, intermediate_size=6656, block_auto_adjust_ff_dim=True),
    "700m": dict(hidden_size=1536, num_hidden_layers=16, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                 num_attention_heads=24, num_key_value_heads=8, intermediate_size=10240, block_auto_adjust_ff_dim=True),
    "1_2b": dict(hidden_size=2048, num_hidden_layers=16, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288, block_auto_adjust_ff_dim=True),
    "2_6b": dict(hidden_size=2048, num_hidden_layers=30, full_attn_idxs=[2, 5, 9, 13, 17, 21, 24, 27],
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=10752, block_auto_adjust_ff_dim=False),
}


def lfm2_ffn_width(
    intermediate_size: int,
    block_auto_adjust_ff_dim: bool = True,
    block_ffn_dim_multiplier: float | None = 1.0,
    block_multiple_of: int = 256,
) -> int:
    """Effective SwiGLU width, exactly as transformers' ``Lfm2MLP`` computes it (6656 -> 4608 for LFM2-350M).

    With auto-adjust: ``int(2/3 * ff)``, then (if a multiplier is set) ``int(mult * ff)`` rounded up to a multiple
    of ``block_multiple_of``. Without auto-adjust the width is used as given (LFM2-2.6B: 10752).
    """
    ff = int(intermediate_size)
    if block_auto_adjust_ff_dim:
        ff = int(2 * ff / 3)
        if block_ffn_dim_multiplier is not None:
            ff = int(block_ffn_dim_multiplier * ff)
            ff = block_multiple_of * ((ff + block_multiple_of - 1) // block_multiple_of)
    return ff


def lfm2_layer_types(
    num_hidden_layers: int | None = None,
    full_attn_idxs: list[int] | None = None,
    layer_types: list[str] | None = None,
) -> tuple[str, ...]:
    """``layer_types`` wins; otherwise attention at ``full_attn_idxs`` (all layers when neither is given, like HF)."""
    if layer_types is not None:
        layer_types = tuple(layer_types)
        if num_hidden_layers is not None and num_hidden_layers != len(layer_types):
            raise ValueError(
                f"num_hidden_layers={num_hidden_layers} but layer_types lists {len(layer_types)} layers; "
                f"give one of them (layer_types alone defines the depth)"
            )
        return layer_types
    if num_hidden_layers is None:
        raise ValueError("give layer_types, or num_hidden_layers (+ full_attn_idxs)")
    idxs = set(range(num_hidden_layers) if full_attn_idxs is None else full_attn_idxs)
    return tuple("full_attention" if i in idxs else "conv" for i in range(num_hidden_layers))


# HF / Liquid config keys of the first generation -> current names
_KEY_ALIASES = {
    "block_dim": "hidden_size", "block_ff_dim": "intermediate_size", "tie_embedding": "tie_word_embeddings",
    "num_heads": "num_attention_heads", "block_norm_eps": "norm_eps", "rms_norm_eps": "norm_eps",
}


def hybrid_config_from_lfm2(cfg: Mapping[str, Any] | None = None, **overrides: Any) -> HybridConfig:
    """A :class:`HybridConfig` from LFM2-style settings: a HF ``config.json`` dict and/or keyword arguments."""
    d: dict[str, Any] = {}
    for src in (cfg or {}), overrides:
        for k, v in src.items():
            k = _KEY_ALIASES.get(k, k)
            d[k] = v
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if isinstance(rope, Mapping) and rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported by the zoo LFM2 port (only 'default')")
    rope_theta = d.get("rope_theta", rope.get("rope_theta", 1_000_000.0) if isinstance(rope, Mapping) else 1_000_000.0)
    layer_types = lfm2_layer_types(d.get("num_hidden_layers"), d.get("full_attn_idxs"), d.get("layer_types"))
    eos = d.get("eos_token_id", 7)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return HybridConfig(
        vocab_size=int(d.get("vocab_size", 65536)),
        hidden_size=int(d.get("hidden_size", 1024)),
        layer_types=layer_types,
        intermediate_size=lfm2_ffn_width(
            d.get("intermediate_size", 6656), d.get("block_auto_adjust_ff_dim", True),
            d.get("block_ffn_dim_multiplier", 1.0), d.get("block_multiple_of", 256),
        ),
        num_attention_heads=int(d.get("num_attention_heads", 16)),
        num_key_value_heads=int(d.get("num_key_value_heads", 8)),
        head_dim=d.get("head_dim"),
        norm_eps=float(d.get("norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        conv_L_cache=int(d.get("conv_L_cache", 3)),
        conv_bias=bool(d.get("conv_bias", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 128_000)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        pad_token_id=d.get("pad_token_id", 0),
        bos_token_id=d.get("bos_token_id", 1),
        eos_token_id=eos,
    )


def lfm2_config_dict(config: HybridConfig, model_type: str = "lfm2") -> dict[str, Any]:
    """The HF ``config.json`` content for ``config`` (readable by transformers' ``Lfm2Config`` and by us)."""
    unknown = sorted(set(config.layer_types) - {"conv", "full_attention"})
    if unknown and model_type == "lfm2":
        raise ValueError(f"layer types {unknown} cannot be expressed as a transformers LFM2 config")
    return {
        "architectures": ["Lfm2ForCausalLM" if model_type == "lfm2" else "ZooLfm2ForCausalLM"],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "block_auto_adjust_ff_dim": False,  # the width above is already effective
        "num_hidden_layers": config.num_hidden_layers,
        "layer_types": list(config.layer_types),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        **({"head_dim": config.head_dim} if config.head_dim else {}),
        "norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "conv_L_cache": config.conv_L_cache,
        "conv_bias": config.conv_bias,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


class Lfm2LM(HybridLM):
    """LFM2 causal LM. Keyword arguments use transformers' ``Lfm2Config`` names (``intermediate_size`` is the
    config value before the auto-adjust rule, like ``block_ff_dim``); ``config=`` takes a ready :class:`HybridConfig`.
    """

    def __init__(self, config: HybridConfig | None = None, **kwargs: Any):
        for bad in ("num_classes", "in_chans"):
            if kwargs.get(bad) is not None:
                raise TypeError(
                    f"{bad} does not apply to a language model; use vocab_size= to change the output size"
                )
            kwargs.pop(bad, None)
        kwargs.pop("deploy", None)  # there is no separate deploy form
        if config is None:
            config = hybrid_config_from_lfm2(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        super().__init__(config)

    # --------------------------------------------------------------------------------- HF-layout save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        model_type: str = "lfm2",
        state_dict: Mapping[str, torch.Tensor] | None = None,
        tokenizer: Any = None,
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in transformers' LFM2 layout (loadable by
        ``transformers.Lfm2ForCausalLM``, ``ZooLfm2ForCausalLM`` and :func:`load_pretrained`), plus the tokenizer --
        ``tokenizer`` or the one :func:`load_pretrained` attached as ``model.tokenizer`` -- so the folder serves
        ``zoo generate`` and ``transformers.pipeline("text-generation", model=folder)`` alone. ``state_dict`` replaces
        the model's own (e.g. a full state dict gathered from FSDP shards)."""
        from zoo.checkpoints import save_file
        from zoo.language.hybrid import save_tokenizer

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(lfm2_config_dict(self.config, model_type), indent=2) + "\n")
        sd = dict(self.state_dict() if state_dict is None else state_dict)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        if tokenizer is not None:
            c = self.config
            save_tokenizer(tokenizer, out, {"pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
                                            "eos_token_id": c.eos_token_id})
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides: Any) -> "Lfm2LM":
        return load_pretrained(path, dtype=dtype, **overrides)


def _tied_or_head(sd: dict, model_has_head: bool) -> None:
    if not model_has_head:
        head = sd.pop("lm_head.weight", None)
        emb = sd.get("model.embed_tokens.weight")
        if head is not None and emb is not None and head.shape == emb.shape and head.device.type != "meta":
            if head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb):
                log.warning("checkpoint has an untied lm_head but the model ties it to embed_tokens: lm_head dropped")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert an LFM2 state dict (transformers layout, with or without the ``model.`` prefix, our layout, a
    Lightning checkpoint already unwrapped by ``clean_state_dict``) to our keys; casts to the model's dtype."""
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith("rotary_emb.inv_freq") or k.endswith("original_inv_freq"):
            continue  # RoPE tables are recomputed
        if k != "lm_head.weight" and not k.startswith("model."):
            k = "model." + k
        if k.endswith(".conv.conv.weight") and v.ndim == 2:  # llama.cpp / ExecuTorch squeeze [d, 1, L] -> [d, L]
            v = v[:, None, :]
        out[k] = v
    _tied_or_head(out, getattr(model, "lm_head", None) is not None)
    for k, v in out.items():
        ref = own.get(k)
        if ref is not None and v.is_floating_point() and v.dtype != ref.dtype:
            out[k] = v.to(ref.dtype)
    return out


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{cfg_file} not found: an LFM2 checkpoint folder needs config.json next to its *.safetensors "
            f"(Hugging Face layout); for a bare weights file use zoo.create_model(name, checkpoint_path=FILE)"
        )
    d = json.loads(cfg_file.read_text())
    if "text_config" in d and d.get("model_type", "").startswith("lfm2") and d["model_type"] != "lfm2":
        d = d["text_config"]  # LFM2-VL: the language model part
    mt = d.get("model_type")
    if mt not in (None, "lfm2", "zoo_lfm2"):
        raise ValueError(f"{cfg_file} describes a {mt!r} model, not LFM2 (model_type 'lfm2' or 'zoo_lfm2')")
    return d


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **overrides: Any
) -> Lfm2LM:
    """Build an :class:`Lfm2LM` from a Hugging Face LFM2 folder (config.json + *.safetensors) in eval mode; a
    ``tokenizer.json`` next to the weights is attached as ``model.tokenizer`` (a ``tokenizers.Tokenizer``).

    The model is created on the ``meta`` device and the checkpoint tensors are assigned to it (cast to ``dtype``,
    default fp32), so loading never holds a second copy of the weights. ``overrides`` change config values
    (e.g. ``max_position_embeddings``).
    """
    from safetensors import safe_open

    from zoo.checkpoints import load_weights

    path = Path(path)
    cfg = hybrid_config_from_lfm2(_read_config(path), **overrides)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    with torch.device("meta"):
        model = Lfm2LM(config=cfg).to(dtype or torch.get_default_dtype())
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    sd = checkpoint_filter_fn(sd, model)
    load_weights(model, sd, context=f"lfm2 <- {path}", assign=True)
    attach_folder_tokenizer(model, path)
    return model.eval()


# ---------------------------------------------------------------------------------------------- registry


def _cfg(hub_id: str | None = None, **kw) -> ModelCfg:
    return ModelCfg(
        task="text-generation",
        family="lfm2",
        paper="2511.23404",
        license="lfm1.0",
        num_classes=65536,
        input_size=(),
        pool_size=None,
        crop_pct=1.0,
        interpolation="",
        mean=(),
        std=(),
        first_conv=None,
        classifier=None,
        source=CheckpointSource(hf_hub_id=hub_id, hf_filename="model.safetensors", layout="hf") if hub_id else None,
        notes="Liquid AI LFM2 weights (bf16, LFM Open License v1.0); tokenizer: the hub repo's tokenizer.json. "
        "No sha256 pinned: the hub revision is trusted." if hub_id else "",
        **kw,
    )


# zoo.create_model builds these on the meta device when a checkpoint follows and assigns its tensors (one copy).
load_on_meta = True

default_cfgs = {
    "lfm2_350m.liquid": _cfg("LiquidAI/LFM2-350M"),
    "lfm2_700m.liquid": _cfg("LiquidAI/LFM2-700M"),
    "lfm2_1_2b.liquid": _cfg("LiquidAI/LFM2-1.2B"),
    "lfm2_2_6b.liquid": _cfg("LiquidAI/LFM2-2.6B"),
}


def _create(size: str, kwargs: dict[str, Any]) -> Lfm2LM:
    defaults = dict(LFM2_CONFIGS[size])
    if "layer_types" in kwargs:  # an explicit layer list defines the depth
        defaults.pop("num_hidden_layers")
        defaults.pop("full_attn_idxs")
    return Lfm2LM(**{**defaults, **kwargs})


@register_model
def lfm2_350m(**kwargs) -> Lfm2LM:
    """LFM2-350M: 16 layers (10 conv + 6 GQA), d=1024, FFN 4608; 354,483,968 parameters."""
    return _create("350m", kwargs)


@register_model
def lfm2_700m(**kwargs) -> Lfm2LM:
    """LFM2-700M: 16 layers (10 conv + 6 GQA), d=1536, FFN 6912; 742,489,344 parameters."""
    return _create("700m", kwargs)


@register_model
def lfm2_1_2b(**kwargs) -> Lfm2LM:
    """LFM2-1.2B: 16 layers (10 conv + 6 GQA), d=2048, FFN 8192; 1,170,340,608 parameters."""
    return _create("1_2b", kwargs)


@register_model
def lfm2_2_6b(**kwargs) -> Lfm2LM:
    """LFM2-2.6B: 30 layers (22 conv + 8 GQA), d=2048, FFN 10752 (no auto-adjust); 2,569,272,320 parameters."""
    return _create("2_6b", kwargs)


# ---------------------------------------------------------------------------------------------- transformers


_HF: dict[str, Any] = {}


def register_transformers() -> tuple[type, type]:
    """Build ``ZooLfm2Config``, ``ZooLfm2Model`` and ``ZooLfm2ForCausalLM`` (the shared hybrid transformers classes,
    :func:`zoo.language.hybrid.hf_model_classes`) and register them with ``AutoConfig``, ``AutoModel`` and
    ``AutoModelForCausalLM`` (idempotent). Returns the config and causal-LM classes."""
    if _HF:
        return _HF["ZooLfm2Config"], _HF["ZooLfm2ForCausalLM"]
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.lfm2.configuration_lfm2 import Lfm2Config

    class ZooLfm2Config(Lfm2Config):
        """transformers config of the zoo LFM2 port: same fields as ``Lfm2Config``, its own ``model_type``, and no
        tensor-parallel plan (the model provides none)."""

        model_type = "zoo_lfm2"
        base_model_tp_plan = None
        base_model_pp_plan = None

    classes = hf_model_classes("ZooLfm2", ZooLfm2Config, lambda c: hybrid_config_from_lfm2(c.to_dict()))
    AutoConfig.register("zoo_lfm2", ZooLfm2Config, exist_ok=True)
    AutoModel.register(ZooLfm2Config, classes["ZooLfm2Model"], exist_ok=True)
    AutoModelForCausalLM.register(ZooLfm2Config, classes["ZooLfm2ForCausalLM"], exist_ok=True)
    ZooLfm2Config.__module__ = __name__
    for cls in classes.values():
        cls.__module__ = __name__
    _HF.update(ZooLfm2Config=ZooLfm2Config, **classes)
    return ZooLfm2Config, classes["ZooLfm2ForCausalLM"]


def to_transformers(model: HybridLM, config_overrides: dict[str, Any] | None = None):
    """Wrap a zoo LFM2 model as ``ZooLfm2ForCausalLM`` sharing its weights (no copy)."""
    cfg_cls, model_cls = register_transformers()
    d = lfm2_config_dict(model.config, "zoo_lfm2")
    d.pop("architectures")
    d.pop("model_type")
    d.update(config_overrides or {})
    with torch.device("meta"):
        hf = model_cls(cfg_cls(**d))
    hf.model.embed_tokens, hf.model.layers = model.model.embed_tokens, model.model.layers
    hf.model.embedding_norm = model.model.embedding_norm
    hf.lm_head = model.lm_head
    return hf.train(model.training)


def __getattr__(name: str):
    if name in ("ZooLfm2Config", "ZooLfm2ForCausalLM", "ZooLfm2Model", "ZooLfm2PreTrainedModel"):
        register_transformers()
        return _HF[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
