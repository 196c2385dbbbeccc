"""MobileCLIP (arXiv 2311.17049, apple/ml-mobileclip) and MobileCLIP2 (arXiv 2508.20691): mobile image-text models.

A CLIP model here is an image tower (an MCi FastViT from :mod:`zoo.vision.fastvit`, or a timm ViT for the B and L/14
variants) whose classifier ``head.fc`` is the CLIP projection, a text transformer with a bias-free projection, and a
learned temperature ``logit_scale`` whose exponential is clamped to 100 in ``forward`` (Apple's ``CLIP``).

Text towers (vocab 49408, context 77, EOT pooling = the position of the largest token id, as both references):
- ``"base"``: 12 pre-norm transformer layers, width 512 (768 for S3/S4/L-14), non-causal for the S models and causal
  for B (open_clip ``no_causal_mask``);
- ``"mct"`` (MobileCLIP-S0 v1 only): a 1-D RepMixer block (depthwise kernel 11), 4 transformer layers and another
  RepMixer block. Its RepMixer folds into one depthwise conv (``reparameterize()``); the ConvFFN stays as in Apple's
  code. As in Apple's ``MobileOneBlock``, a tuple kernel ``(1, 11)`` gets no 1x1 scale branch (the code compares
  ``kernel_size[0] > 1``), which is why the MCt tower has 42.441M parameters and not 42.444M.

Token embeddings: Apple stores ``embed_scale = dim ** -0.5`` but never multiplies by it in ``forward`` (it is only the
init std); open_clip does not scale either. We do the same: init with that std, no scaling at run time.

Parameter names follow open_clip's ``CustomTextCLIP`` (``visual.trunk.*``, ``text.*``, ``logit_scale``), so open_clip
and Hugging Face ``*-OpenCLIP`` files load as they are; :func:`checkpoint_filter_fn` also reads Apple's ml-mobileclip
``.pt`` files (``image_encoder.model.*`` / ``text_encoder.*``), in training or deploy form, and names the right
variant when a checkpoint belongs to another one.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.layers import fold_bn_into_conv
from zoo.registry import CheckpointSource, ModelCfg, register_model
from zoo.vision import fastvit
from zoo.vision.fastvit import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FastVit

log = logging.getLogger(__name__)

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77


# ----------------------------------------------------------------------------------------------- text blocks


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (Apple's ``LayerNormFP32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class TextMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``. The attention is torch's
    ``nn.MultiheadAttention`` (packed ``in_proj`` q, k, v rows, as Apple's ``qkv_proj``; its fused inference path)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, causal: bool = False, context_length: int = 77):
        super().__init__()
        self.ln_1 = LayerNormFp32(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_2 = LayerNormFp32(dim)
        self.mlp = TextMlp(dim, mlp_hidden)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1) if causal else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x):
        n = x.shape[1]
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class ConvBN1d(nn.Sequential):
    """Depthwise 1-D conv (no bias) + BatchNorm over a (B, C, L) sequence."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn_into_conv(self.conv.weight, None, self.bn)


def _bn_as_kernel(bn: nn.BatchNorm1d, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An identity BatchNorm written as a depthwise kernel of width ``k`` (centre tap) and a bias."""
    eye = torch.zeros(bn.num_features, 1, k, dtype=bn.weight.dtype, device=bn.weight.device)
    eye[:, 0, k // 2] = 1.0
    return fold_bn_into_conv(eye, None, bn)


class TextRepMixer(nn.Module):
    """1-D RepMixer: ``x + gamma * (mixer(x) - norm(x))`` with ``mixer = BN(dwconv_k(x)) + BN(x)`` and
    ``norm = BN(x)``; folds into one depthwise conv ``W = I + gamma (W_mixer - W_norm)``, ``b = gamma (b_mixer - b_norm)``.
    """

    def __init__(self, dim: int, kernel_size: int = 11, layer_scale_init_value: float = 1e-5, deploy: bool = False):
        super().__init__()
        self.dim, self.kernel_size, self.deployed = dim, kernel_size, deploy
        if deploy:
            self.reparam_conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        else:
            self.norm_identity = nn.BatchNorm1d(dim)
            self.mixer_conv = ConvBN1d(dim, kernel_size)
            self.mixer_identity = nn.BatchNorm1d(dim)
            self.gamma = nn.Parameter(torch.full((dim, 1), layer_scale_init_value))

    def forward(self, x):
        if self.deployed:
            return self.reparam_conv(x)
        return x + self.gamma * (self.mixer_conv(x) + self.mixer_identity(x) - self.norm_identity(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        k = self.kernel_size
        wc, bc = self.mixer_conv.fused()
        wi, bi = _bn_as_kernel(self.mixer_identity, k)
        wn, bn = _bn_as_kernel(self.norm_identity, k)
        eye = torch.zeros_like(wc)
        eye[:, 0, k // 2] = 1.0
        g = self.gamma.double()
        w = eye.double() + g.unsqueeze(-1) * (wc.double() + wi.double() - wn.double())
        b = g.reshape(-1) * (bc.double() + bi.double() - bn.double())
        conv = nn.Conv1d(self.dim, self.dim, k, padding=k // 2, groups=self.dim).to(wc.device)
        conv.weight.copy_(w.to(wc.dtype))
        conv.bias.copy_(b.to(wc.dtype))
        del self.norm_identity, self.mixer_conv, self.mixer_identity, self.gamma
        self.reparam_conv = conv
        self.deployed = True


class TextConvFFN(nn.Module):
    """ConvFFN over a sequence: depthwise conv + BN, 1x1 fc1, GELU, 1x1 fc2 (not folded, as in Apple's code)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 11):
        super().__init__()
        self.conv = ConvBN1d(dim, kernel_size)
        self.fc1 = nn.Conv1d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv1d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class TextRepMixerBlock(nn.Module):
    """MCt block on (B, L, D) tokens: ``x = RepMixer(x); x = x + gamma * ConvFFN(x)`` along the sequence axis."""

    def __init__(self, dim: int, kernel_size: int = 11, mlp_ratio: float = 4.0, layer_scale_init_value: float = 1e-5,
                 deploy: bool = False):
        super().__init__()
        self.token_mixer = TextRepMixer(dim, kernel_size, layer_scale_init_value, deploy)
        self.mlp = TextConvFFN(dim, int(dim * mlp_ratio), kernel_size)
        self.gamma = nn.Parameter(torch.full((dim, 1), layer_scale_init_value))

    def forward(self, x):
        x = self.token_mixer(x.transpose(1, 2))
        x = x + self.gamma * self.mlp(x)
        return x.transpose(1, 2)


class _Blocks(nn.Module):
    """Holds ``resblocks`` so parameter names read ``text.transformer.resblocks.N`` as in open_clip."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x):
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class TextTransformer(nn.Module):
    """MobileCLIP text encoder: token + learned positional embedding, blocks, final LayerNorm, EOT pooling, projection.

    Args:
        variant: ``"base"`` (``layers`` transformer layers) or ``"mct"`` (RepMixer, ``layers`` transformer layers,
            RepMixer).
        causal: causal attention mask (MobileCLIP-B); the S models attend both ways.
    """

    def __init__(self, embed_dim: int = 512, width: int = 512, heads: int = 8, layers: int = 12, variant: str = "base",
                 causal: bool = False, context_length: int = CONTEXT_LENGTH, vocab_size: int = VOCAB_SIZE,
                 mlp_ratio: float = 4.0, repmixer_kernel_size: int = 11, deploy: bool = False):
        super().__init__()
        if variant not in ("base", "mct"):
            raise ValueError(f"text variant {variant!r}: use 'base' or 'mct'")
        self.variant, self.causal, self.width = variant, causal, width
        self.context_length, self.vocab_size, self.output_dim = context_length, vocab_size, embed_dim
        hidden = int(math.ceil(width * mlp_ratio / 16.0) * 16)  # Apple: ffn dim rounded up to a multiple of 16
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        blocks: list[nn.Module] = [TransformerBlock(width, heads, hidden, causal, context_length) for _ in range(layers)]
        if variant == "mct":
            blocks = [TextRepMixerBlock(width, repmixer_kernel_size, mlp_ratio, deploy=deploy), *blocks,
                      TextRepMixerBlock(width, repmixer_kernel_size, mlp_ratio, deploy=deploy)]
        self.transformer = _Blocks(blocks)
        self.ln_final = LayerNormFp32(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.positional_embedding.is_meta:
            return
        std = self.width ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=std)  # Apple's embed_scale, used as init std only
        nn.init.trunc_normal_(self.positional_embedding, std=std)
        nn.init.normal_(self.text_projection, std=std)
        for m in self.modules():
            if isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=std)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_tokens(self, text: torch.Tensor) -> None:
        if text.ndim != 2 or text.dtype.is_floating_point:
            raise ValueError(f"text must be a (batch, tokens) integer tensor of token ids, got {tuple(text.shape)} "
                             f"{text.dtype}; tokenize with zoo.get_tokenizer(model_name)")
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens but the context length is {self.context_length}: "
                             f"tokenize with context_length={self.context_length} (zoo.get_tokenizer pads/truncates)")

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Per-token features after the final LayerNorm, (B, L, width)."""
        self.check_tokens(text)
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        return self.ln_final(self.transformer(x))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(text)
        eot = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # EOT = the largest token id
        return eot @ self.text_projection

    @torch.no_grad()
    def reparameterize(self) -> None:
        for m in self.modules():
            if isinstance(m, TextRepMixer):
                m.reparameterize()


# ---------------------------------------------------------------------------------------------- image tower


class ImageTower(nn.Module):
    """An image backbone whose classifier is the CLIP projection (open_clip's ``TimmModel`` with ``proj=None``)."""

    def __init__(self, trunk: nn.Module, image_size: int, in_chans: int = 3, dynamic_img_size: bool = False):
        super().__init__()
        self.trunk = trunk
        self.image_size, self.in_chans, self.dynamic_img_size = image_size, in_chans, dynamic_img_size
        self.stride = 64 if isinstance(trunk, FastVit) and trunk.num_stages == 5 else 32

    def check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"images must be (batch, {self.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.dynamic_img_size:
            if h % self.stride or w % self.stride:
                raise ValueError(f"image size {h}x{w} must be a multiple of {self.stride} (the tower's stride)")
        elif (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} (the model's input size), got {h}x{w}; "
                             f"use the model's transform (zoo.vision.mobileclip.image_transform) or build the model "
                             f"with dynamic_img_size=True (MCi towers only)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        return self.trunk(x)


# --------------------------------------------------------------------------------------------------- model


class MobileCLIP(nn.Module):
    """CLIP model with open_clip's API: ``encode_image``, ``encode_text``, ``forward(image, text)``.

    ``forward`` returns ``(image_features, text_features, logit_scale)`` with L2-normalised features (``None`` for a
    missing input) and ``logit_scale = exp(self.logit_scale)`` clamped to ``max_logit_scale`` (100), as Apple's CLIP.
    """

    def __init__(self, visual: ImageTower, text: TextTransformer, embed_dim: int, init_logit_scale: float = math.log(1 / 0.07),
                 max_logit_scale: float = 100.0, output_dict: bool = False):
        super().__init__()
        self.visual, self.text = visual, text
        self.embed_dim, self.max_logit_scale, self.output_dict = embed_dim, max_logit_scale, output_dict
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"logit_scale", "text.positional_embedding"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.text.transformer.grad_checkpointing = enable
        if hasattr(self.visual.trunk, "set_grad_checkpointing"):
            self.visual.trunk.set_grad_checkpointing(enable)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(text)
        return F.normalize(x, dim=-1) if normalize else x

    def get_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        scale = self.get_logit_scale()
        if self.output_dict:
            return {"image_features": img, "text_features": txt, "logit_scale": scale}
        return img, txt, scale

    def get_logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text)."""
        img, txt, scale = self.forward(image, text)
        logits = scale * img @ txt.t()
        return logits, logits.t()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the image tower (MobileOne / RepMixer / RepCPE branches) and the MCt text RepMixers in place."""
        trunk = self.visual.trunk
        if hasattr(trunk, "reparameterize"):
            trunk.reparameterize()
        self.text.reparameterize()


# ------------------------------------------------------------------------------------------------- export


def _single_file(path) -> None:
    """torch 2.14's ONNX exporter may leave the weights in a sidecar named after its temporary file; fold them back
    into the graph file (the encoders are far below ONNX's 2 GB limit)."""
    import onnx

    sidecars = list(path.parent.glob(f".{path.name}*.data"))
    if sidecars:
        onnx.save(onnx.load(str(path)), str(path))
        for p in sidecars:
            p.unlink()


def export_onnx(model: MobileCLIP, folder, *, batch_size: int = 2, check_batch_size: int = 3, rtol: float = 1e-4,
                atol: float = 1e-5, reparameterize: bool = True) -> dict[str, str]:
    """Export the image encoder (``image.onnx``: pixels -> projected features) and the text encoder (``text.onnx``:
    token ids -> projected features) separately, with a dynamic batch, from the deploy form. Each file is checked with
    onnxruntime against eager at ``check_batch_size`` (another batch size than the traced one); a file that fails
    its check is removed."""
    from pathlib import Path

    from zoo.deploy import export, onnx_parity
    from zoo.deploy import reparameterize as fold

    if batch_size == check_batch_size:
        raise ValueError("check_batch_size must differ from batch_size, so a frozen batch dimension is caught")
    folder = Path(folder)
    model = fold(model) if reparameterize else model.eval()
    c, size = model.visual.in_chans, model.visual.image_size
    g = torch.Generator().manual_seed(0)
    eot = model.vocab_size - 1

    def tokens(n):  # valid ids, the end token (the largest id) at different positions
        t = torch.randint(1, eot, (n, model.context_length), generator=g)
        t[torch.arange(n), torch.arange(n) % (model.context_length - 1) + 1] = eot
        return t

    out = {}
    for name, module, x, xc in (
        ("image", model.visual, torch.rand(batch_size, c, size, size, generator=g),
         torch.rand(check_batch_size, c, size, size, generator=g)),
        ("text", model.text, tokens(batch_size), tokens(check_batch_size)),
    ):
        path = folder / f"{name}.onnx"
        export(module, path, "onnx", example_input=x, reparameterize=False, check=False)
        try:
            _single_file(path)
            onnx_parity(path, module, xc, rtol, atol)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        out[name] = str(path)
    return out


# --------------------------------------------------------------------------------------------- transforms


def image_transform(model_or_cfg: nn.Module | ModelCfg, is_training: bool = False):
    """The model's eval preprocessing from its data config (open_clip's MobileCLIP config): resize the shortest
    side to the input size (bilinear), centre crop, scale to [0, 1], normalise with the config's mean/std (zero and
    one for every variant but MobileCLIP2-S3/S4/L-14, which use OpenAI's). ``is_training`` adds a random resized crop."""
    from torchvision import transforms as T

    cfg = getattr(model_or_cfg, "pretrained_cfg", model_or_cfg)
    if not isinstance(cfg, ModelCfg):
        raise ValueError("image_transform needs a model made by zoo.create_model (it carries pretrained_cfg) or a ModelCfg")
    size = cfg.input_size[-1]
    interp = T.InterpolationMode(cfg.interpolation)
    head = ([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=interp)] if is_training
            else [T.Resize(size, interpolation=interp), T.CenterCrop(size)])
    to_rgb = T.Lambda(lambda im: im.convert("RGB") if hasattr(im, "convert") else im)
    return T.Compose([to_rgb, *head, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


# ------------------------------------------------------------------------------------------- checkpoints

_APPLE_TEXT_RENAMES = (
    (r"^embedding_layer\.", "token_embedding."),
    (r"^positional_embedding\.pos_embed\.pos_embed$", "positional_embedding"),
    (r"^final_layer_norm\.", "ln_final."),
    (r"^projection_layer$", "text_projection"),
    (r"^transformer\.(\d+)\.pre_norm_mha\.0\.", r"transformer.resblocks.\1.ln_1."),
    (r"^transformer\.(\d+)\.pre_norm_mha\.1\.qkv_proj\.weight$", r"transformer.resblocks.\1.attn.in_proj_weight"),
    (r"^transformer\.(\d+)\.pre_norm_mha\.1\.qkv_proj\.bias$", r"transformer.resblocks.\1.attn.in_proj_bias"),
    (r"^transformer\.(\d+)\.pre_norm_mha\.1\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^transformer\.(\d+)\.pre_norm_ffn\.0\.", r"transformer.resblocks.\1.ln_2."),
    (r"^transformer\.(\d+)\.pre_norm_ffn\.1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^transformer\.(\d+)\.pre_norm_ffn\.4\.", r"transformer.resblocks.\1.mlp.c_proj."),
    # MCt RepMixer blocks
    (r"^transformer\.(\d+)\.token_mixer\.norm\.rbr_skip\.", r"transformer.resblocks.\1.token_mixer.norm_identity."),
    (r"^transformer\.(\d+)\.token_mixer\.mixer\.rbr_conv\.0\.", r"transformer.resblocks.\1.token_mixer.mixer_conv."),
    (r"^transformer\.(\d+)\.token_mixer\.mixer\.rbr_skip\.", r"transformer.resblocks.\1.token_mixer.mixer_identity."),
    (r"^transformer\.(\d+)\.token_mixer\.layer_scale$", r"transformer.resblocks.\1.token_mixer.gamma"),
    (r"^transformer\.(\d+)\.token_mixer\.reparam_conv\.", r"transformer.resblocks.\1.token_mixer.reparam_conv."),
    (r"^transformer\.(\d+)\.convffn\.conv\.", r"transformer.resblocks.\1.mlp.conv."),
    (r"^transformer\.(\d+)\.convffn\.fc", r"transformer.resblocks.\1.mlp.fc"),
    (r"^transformer\.(\d+)\.layer_scale$", r"transformer.resblocks.\1.gamma"),
)


def _apple_text_to_ours(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        new = k
        for pat, rep in _APPLE_TEXT_RENAMES:
            new, n = re.subn(pat, rep, new)
            if n:
                break
        if new == "positional_embedding":
            v = v.reshape(v.shape[-2], v.shape[-1])  # Apple: (1, 1, L, D)
        elif v.ndim == 4 and v.shape[2] == 1 and (".token_mixer." in new or ".mlp." in new):
            v = v.squeeze(2)  # Apple's (C, 1, 1, k) / (C, C, 1, 1) 2-D convs over (B, C, 1, L) -> our Conv1d
        elif v.ndim == 3 and new.endswith((".gamma",)):
            v = v.reshape(v.shape[0], 1)  # Apple's layer scale (C, 1, 1)
        out[new] = v
    return out


def _visual_filter(sd: dict, model: "MobileCLIP") -> dict:
    """Image-tower keys (no prefix) in any supported layout -> the trunk's keys."""
    trunk = model.visual.trunk
    if isinstance(trunk, FastVit):
        return fastvit.checkpoint_filter_fn(sd, trunk)
    if any(k.startswith("patch_emb.") for k in sd):  # Apple's ViT-B ("vit_b16") layout -> timm's
        from timm.models.vision_transformer_hybrid import checkpoint_filter_fn as vit_mci_filter

        return vit_mci_filter({f"image_encoder.model.{k}": v for k, v in sd.items()}, trunk)
    return sd


def _split(sd: dict, prefixes: Sequence[str]) -> dict:
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if sub:
            return sub
    return {}


def checkpoint_filter_fn(state_dict: dict, model: "MobileCLIP") -> dict:
    """Apple ml-mobileclip ``.pt`` (``image_encoder.model.*``, ``text_encoder.*``), open_clip / HF ``*-OpenCLIP``
    (``visual.trunk.*``, ``text.*``) and our own files -> our layout, in the model's form (training or deploy)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    apple = any(k.startswith(("image_encoder.", "text_encoder.")) for k in sd)
    if apple:
        vis = _split(sd, ("image_encoder.model.",))
        txt = _apple_text_to_ours(_split(sd, ("text_encoder.",)))
    else:
        vis = _split(sd, ("visual.trunk.",))
        txt = _split(sd, ("text.",))
    if not vis or not txt:
        raise ValueError("checkpoint has no image tower (visual.trunk.* / image_encoder.model.*) or no text tower "
                         "(text.* / text_encoder.*): not a MobileCLIP checkpoint")
    timm_layout = any(k.startswith(("stages.", "blocks.")) for k in vis)
    if timm_layout:  # check before converting: form conversion would fail on another variant's keys first
        _check_variant(vis, txt, model)
    vis = _visual_filter(vis, model)
    if not timm_layout:
        _check_variant(vis, txt, model)
    out = {f"visual.trunk.{k}": v for k, v in vis.items()}
    out.update({f"text.{k}": v for k, v in _text_form(txt, model).items()})
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"].reshape(())
    return out


def _text_form(txt: dict, model: "MobileCLIP") -> dict:
    """Convert the MCt RepMixers between training and deploy form to match the model."""
    own = model.text.state_dict()
    ck_deploy = any(".token_mixer.reparam_conv." in k for k in txt)
    model_deploy = any(".token_mixer.reparam_conv." in k for k in own)
    if ck_deploy == model_deploy or model.text.variant != "mct":
        return txt
    if ck_deploy:
        raise ValueError("this checkpoint's MCt text tower is in deploy form (folded RepMixers); build the model with "
                         "deploy=True to load it")
    if next(model.parameters()).is_meta:
        return txt
    twin = TextTransformer(**model.text_build_args)
    twin.load_state_dict(txt)
    twin.eval().reparameterize()
    return twin.state_dict()


def _text_signature(txt: dict) -> tuple[int | None, int, bool]:
    """(width, blocks, MCt?) of a text state dict."""
    tw = txt.get("token_embedding.weight")
    blocks = {int(m.group(1)) for k in txt if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return (tw.shape[1] if tw is not None else None, len(blocks), any(".token_mixer." in k for k in txt))


def _image_signature(vis: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stage widths, blocks per stage) of an MCi tower, or ((width,), (depth,)) of a ViT tower."""
    widths, depth = {}, {}
    for k, v in vis.items():
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depth[i] = max(depth.get(i, 0), j + 1)
            if k.endswith(".mlp.fc2.weight"):
                widths[i] = v.shape[0]
        elif (m := re.match(r"blocks\.(\d+)\.", k)):
            depth[0] = max(depth.get(0, 0), int(m.group(1)) + 1)
        elif k == "pos_embed":
            widths[0] = v.shape[-1]
    return tuple(widths[i] for i in sorted(widths)), tuple(depth[i] for i in sorted(depth))


def _describe(text_sig, image_sig) -> str:
    (w, n, mct), (widths, depths) = text_sig, image_sig
    return (f"text width {w}, {n} blocks{' (MCt)' if mct else ''}; image widths {list(widths)}, depths {list(depths)}")


def _check_variant(vis: dict, txt: dict, model: "MobileCLIP") -> None:
    own = (_text_signature(model.text.state_dict()), _image_signature(model.visual.trunk.state_dict()))
    got = (_text_signature(txt), _image_signature(vis))
    if got == own:
        return
    name = getattr(model, "model_name", None) or "this model"
    match = []  # variants with this kind of text tower and these image widths (depths may be reduced by overrides)
    for variant, spec in _VARIANTS.items():
        t = spec["text"]
        if (t["width"], t["variant"] == "mct") != (got[0][0], got[0][2]):
            continue
        with torch.device("meta"):
            trunk = _image_tower(spec, spec["embed"], {}, False, 3, False).trunk
        if _image_signature(trunk.state_dict())[0] == got[1][0]:
            match.append(variant)
    hint = (f"it is a {' / '.join(match)} checkpoint: use zoo.create_model({match[0]!r}, checkpoint_path=...)"
            if match else "it matches no registered MobileCLIP variant")
    raise ValueError(f"checkpoint does not fit {name}: the model expects {_describe(*own)}, the checkpoint has "
                     f"{_describe(*got)}; {hint}")


# ----------------------------------------------------------------------------------------------- variants

_MCCFG = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_MC2CFG = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_TEXT_BASE = dict(width=512, heads=8, layers=12, variant="base")
_TEXT_L = dict(width=768, heads=12, layers=12, variant="base")

# name -> image tower, image size, embed dim, text config, data config
_VARIANTS: dict[str, dict[str, Any]] = {
    "mobileclip_s0": dict(image="fastvit_mci0", size=256, embed=512, head_bias=False, norm=_MCCFG,
                          text=dict(width=512, heads=8, layers=4, variant="mct")),
    "mobileclip_s1": dict(image="fastvit_mci1", size=256, embed=512, head_bias=False, norm=_MCCFG, text=_TEXT_BASE),
    "mobileclip_s2": dict(image="fastvit_mci2", size=256, embed=512, head_bias=False, norm=_MCCFG, text=_TEXT_BASE),
    "mobileclip_b": dict(image="vit_base_mci_224", size=224, embed=512, norm=_MCCFG, text={**_TEXT_BASE, "causal": True}),
    "mobileclip2_s0": dict(image="fastvit_mci0", size=256, embed=512, norm=_MCCFG, text=_TEXT_BASE),
    "mobileclip2_s2": dict(image="fastvit_mci2", size=256, embed=512, norm=_MCCFG, text=_TEXT_BASE),
    "mobileclip2_b": dict(image="vit_base_mci_224", size=224, embed=512, norm=_MCCFG, text={**_TEXT_BASE, "causal": True}),
    "mobileclip2_s3": dict(image="fastvit_mci3", size=256, embed=768, norm=_MC2CFG, text=_TEXT_L),
    "mobileclip2_s4": dict(image="fastvit_mci4", size=256, embed=768, norm=_MC2CFG, text=_TEXT_L),
    "mobileclip2_l14": dict(image="vit_large_patch14_clip_224", size=224, embed=768, norm=_MC2CFG, text=_TEXT_L,
                            image_args=dict(drop_path_rate=0.1)),
}


def _image_tower(spec: dict, embed: int, image_args: dict, deploy: bool, in_chans: int, dynamic_img_size: bool) -> ImageTower:
    name = spec["image"]
    if name.startswith("fastvit_"):
        builder = getattr(fastvit, name)
        args = dict(num_classes=embed, head_bias=spec.get("head_bias", True), deploy=deploy, in_chans=in_chans)
        trunk = builder(**{**args, **image_args})
    else:  # the ViT towers come from timm (open_clip uses the same modules)
        import timm

        args = dict(num_classes=embed, global_pool="token", in_chans=in_chans, **spec.get("image_args", {}))
        trunk = timm.create_model(name, **{**args, **image_args})
    return ImageTower(trunk, spec["size"], in_chans, dynamic_img_size)


def _build(variant: str, *, embed_dim: int | None = None, image_args: dict | None = None, text_args: dict | None = None,
           deploy: bool = False, in_chans: int = 3, dynamic_img_size: bool = False, **kwargs) -> MobileCLIP:
    """Build a variant; ``image_args`` / ``text_args`` override the towers (e.g. smaller sizes for tests)."""
    if kwargs:
        raise TypeError(f"{variant}: unknown arguments {sorted(kwargs)}; use image_args= / text_args= for the towers")
    spec = _VARIANTS[variant]
    embed = embed_dim or spec["embed"]
    visual = _image_tower(spec, embed, dict(image_args or {}), deploy, in_chans, dynamic_img_size)
    targs = {**spec["text"], **(text_args or {}), "embed_dim": embed, "deploy": deploy}
    text = TextTransformer(**targs)
    text_build = {**targs, "deploy": False}
    model = MobileCLIP(visual, text, embed)
    model.text_build_args = text_build
    return model


def _cfg(variant: str, **kw) -> ModelCfg:
    spec = _VARIANTS[variant]
    base = dict(
        task="zero-shot-image-classification", family="mobileclip", paper="2508.20691" if "2" in variant.split("_")[0] else
        "2311.17049", license="apple-amlr", num_classes=spec["embed"], input_size=(3, spec["size"], spec["size"]),
        pool_size=None, crop_pct=1.0, interpolation="bilinear", first_conv=None, classifier=None, **spec["norm"],
    )
    base.update(kw)
    return ModelCfg(**base)


def _apple_pt(name: str) -> CheckpointSource:
    return CheckpointSource(url=f"https://docs-assets.developer.apple.com/ml-research/datasets/mobileclip/{name}.pt",
                            layout="official")


def _open_clip_hub(repo: str) -> CheckpointSource:
    return CheckpointSource(hf_hub_id=repo, hf_filename="open_clip_model.safetensors", layout="open_clip",
                            file_name=f"{repo.split('/')[-1]}.safetensors")


_IN1K = "imagenet_zeroshot_top1"  # MobileCLIP README, 13B seen samples unless noted
default_cfgs: dict[str, ModelCfg] = {
    "mobileclip_s0.apple": _cfg("mobileclip_s0", metrics={_IN1K: 67.8}, source=_apple_pt("mobileclip_s0")),
    "mobileclip_s1.apple": _cfg("mobileclip_s1", metrics={_IN1K: 72.6}, source=_apple_pt("mobileclip_s1")),
    "mobileclip_s1.datacompdr": _cfg("mobileclip_s1", metrics={_IN1K: 72.6},
                                     source=_open_clip_hub("apple/MobileCLIP-S1-OpenCLIP")),
    "mobileclip_s2.apple": _cfg("mobileclip_s2", metrics={_IN1K: 74.4}, source=_apple_pt("mobileclip_s2")),
    "mobileclip_s2.datacompdr": _cfg("mobileclip_s2", metrics={_IN1K: 74.4},
                                     source=_open_clip_hub("apple/MobileCLIP-S2-OpenCLIP")),
    "mobileclip_b.apple": _cfg("mobileclip_b", metrics={_IN1K: 76.8}, source=_apple_pt("mobileclip_b")),
    "mobileclip_b.apple_lt": _cfg("mobileclip_b", metrics={_IN1K: 77.2}, source=_apple_pt("mobileclip_blt"),
                                  notes="long training: 36B seen samples"),
    "mobileclip_b.datacompdr": _cfg("mobileclip_b", metrics={_IN1K: 76.8},
                                    source=_open_clip_hub("apple/MobileCLIP-B-OpenCLIP")),
    "mobileclip_b.datacompdr_lt": _cfg("mobileclip_b", metrics={_IN1K: 77.2},
                                       source=_open_clip_hub("apple/MobileCLIP-B-LT-OpenCLIP")),
    "mobileclip2_s0.dfndr2b": _cfg("mobileclip2_s0", metrics={_IN1K: 71.5},
                                   source=_open_clip_hub("timm/MobileCLIP2-S0-OpenCLIP"),
                                   notes="README lists 42.4M text params; the released config is the 63.4M base text tower"),
    "mobileclip2_s2.dfndr2b": _cfg("mobileclip2_s2", metrics={_IN1K: 77.2}, source=_open_clip_hub("timm/MobileCLIP2-S2-OpenCLIP")),
    "mobileclip2_b.dfndr2b": _cfg("mobileclip2_b", metrics={_IN1K: 79.4}, source=_open_clip_hub("timm/MobileCLIP2-B-OpenCLIP")),
    "mobileclip2_s3.dfndr2b": _cfg("mobileclip2_s3", metrics={_IN1K: 80.7}, source=_open_clip_hub("timm/MobileCLIP2-S3-OpenCLIP")),
    "mobileclip2_s4.dfndr2b": _cfg("mobileclip2_s4", metrics={_IN1K: 81.9}, source=_open_clip_hub("timm/MobileCLIP2-S4-OpenCLIP")),
    "mobileclip2_l14.dfndr2b": _cfg("mobileclip2_l14", metrics={_IN1K: 81.9},
                                    source=_open_clip_hub("timm/MobileCLIP2-L-14-OpenCLIP")),
}

# open_clip model names of the variants it defines (MobileCLIP-S0 v1 is only in Apple's package)
OPEN_CLIP_NAMES = {
    "mobileclip_s1": "MobileCLIP-S1", "mobileclip_s2": "MobileCLIP-S2", "mobileclip_b": "MobileCLIP-B",
    "mobileclip2_s0": "MobileCLIP2-S0", "mobileclip2_s2": "MobileCLIP2-S2", "mobileclip2_b": "MobileCLIP2-B",
    "mobileclip2_s3": "MobileCLIP2-S3", "mobileclip2_s4": "MobileCLIP2-S4", "mobileclip2_l14": "MobileCLIP2-L-14",
}


@register_model
def mobileclip_s0(**kwargs) -> MobileCLIP:
    """MobileCLIP-S0 (v1): MCi0 + the MCt RepMixer/transformer text encoder."""
    return _build("mobileclip_s0", **kwargs)


@register_model
def mobileclip_s1(**kwargs) -> MobileCLIP:
    """MobileCLIP-S1: MCi1 + 12-layer non-causal text transformer."""
    return _build("mobileclip_s1", **kwargs)


@register_model
def mobileclip_s2(**kwargs) -> MobileCLIP:
    """MobileCLIP-S2: MCi2 + 12-layer non-causal text transformer."""
    return _build("mobileclip_s2", **kwargs)


@register_model
def mobileclip_b(**kwargs) -> MobileCLIP:
    """MobileCLIP-B: ViT-B/16 with a conv stem (timm ``vit_base_mci_224``) + causal text transformer."""
    return _build("mobileclip_b", **kwargs)


@register_model
def mobileclip2_s0(**kwargs) -> MobileCLIP:
    """MobileCLIP2-S0: MCi0 + 12-layer non-causal text transformer (the released config, not MCt)."""
    return _build("mobileclip2_s0", **kwargs)


@register_model
def mobileclip2_s2(**kwargs) -> MobileCLIP:
    return _build("mobileclip2_s2", **kwargs)


@register_model
def mobileclip2_b(**kwargs) -> MobileCLIP:
    return _build("mobileclip2_b", **kwargs)


@register_model
def mobileclip2_s3(**kwargs) -> MobileCLIP:
    """MobileCLIP2-S3: MCi3 (5 stages) + 768-wide text transformer; OpenAI mean/std."""
    return _build("mobileclip2_s3", **kwargs)


@register_model
def mobileclip2_s4(**kwargs) -> MobileCLIP:
    return _build("mobileclip2_s4", **kwargs)


@register_model
def mobileclip2_l14(**kwargs) -> MobileCLIP:
    """MobileCLIP2-L/14: timm ``vit_large_patch14_clip_224`` (drop path 0.1) + 768-wide text transformer."""
    return _build("mobileclip2_l14", **kwargs)


# ------------------------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def zero_shot_classifier(model: MobileCLIP, tokenizer, classnames: Sequence[str], templates: Sequence,
                         device: torch.device | str | None = None, batch_size: int = 256) -> torch.Tensor:
    """(embed_dim, num_classes) weights: per class, the normalised mean of the normalised text embeddings of every
    template (a format string with ``{}`` or a callable), as open_clip's ``build_zero_shot_classifier``."""
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    device = device if device is not None else next(model.parameters()).device
    prompts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]
    emb = []
    for i in range(0, len(prompts), batch_size):
        emb.append(model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device), normalize=True))
    e = torch.cat(emb).reshape(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(e, dim=-1).mean(1), dim=-1).t()
