"""Linear-time token mixers for the hybrid decoder (:mod:`zoo.language.hybrid`), in pure PyTorch (CPU and GPU).

Each operator has a *chunked* form (prefill and training: a few matrix products per chunk of tokens plus a short loop
over chunks) and a *recurrent* form (decoding: one state update per token, so the cost per token does not grow with
the context). Both keep their decode state in the shared hybrid cache (``ctx.cache.layers[layer_idx]``, a
:class:`RecurrentState`), next to the conv windows and KV buffers of the other operators.

Registered ``layer_types`` names:

* ``"deltanet"`` -- :class:`DeltaNet`: q/k/v projections, causal depthwise conv (kernel 4) + SiLU on each, L2-normed
  q and k, ``beta = sigmoid(b_proj(x))``, the delta rule ``S_t = S_{t-1} + k_t beta_t (v_t - S_{t-1}^T k_t)^T``,
  ``o_t = S_t^T q_t / sqrt(d_k)``, per-head RMSNorm of the output, ``o_proj`` (flash-linear-attention's ``DeltaNet``
  layer without output gate, as used by Nemotron-Flash; module name ``gla`` like its checkpoints);
* ``"mamba2"`` (alias ``"m2"``) -- :class:`Mamba2`: ``in_proj`` -> z, x, B, C, dt; causal depthwise conv (kernel 4)
  + SiLU over x, B, C; the SSD scan ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t`` with
  ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)`` per head; gated RMSNorm ``norm(y * silu(z))``; ``out_proj``
  (mamba_ssm's / transformers' ``Mamba2Mixer``; module name ``mamba``);
* ``"ffn"`` -- :class:`FFNOnly`: a SwiGLU as the layer's only sublayer (for patterns that alternate mixers and FFNs,
  with ``intermediate_size=0`` so mixer layers carry no FFN of their own).

Settings come from ``HybridConfig.extra`` (defaults in brackets): ``deltanet_heads`` [num_attention_heads],
``deltanet_conv`` [4], ``deltanet_norm_eps`` [1e-5], ``deltanet_chunk_size`` [64]; ``mamba_d_state`` [128],
``mamba_expand`` [2], ``mamba_d_inner`` [expand * hidden], ``mamba_headdim`` [64], ``mamba_ngroups`` [1],
``mamba_d_conv`` [4], ``mamba_chunk_size`` [256], ``mamba_conv_bias`` [True], ``mamba_proj_bias`` [False],
``mamba_norm_eps`` [1e-5]; ``ffn_size`` [intermediate_size].

Padding: masked positions enter neither conv window nor state (their ``beta`` / ``dt`` is zeroed, so the state
passes through them unchanged), so a left-padded batch equals its rows run alone. Packed sequences (``position_ids``
restarting inside a row) are refused: the scans do not reset their state inside a row.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.language.hybrid import (Linear, NotProgrammable, RMSNorm, SwiGLU, packed_linear, record_linear, record_norm,
                                 record_packed, register_operator)

__all__ = [
    "DeltaNet", "Mamba2", "FFNOnly", "RecurrentState", "delta_rule_chunked", "delta_rule_recurrent",
    "ssd_chunked", "ssd_recurrent", "gated_rms_norm", "mamba2_dims",
]


class RecurrentState:
    """Decode state of one recurrent layer in the hybrid cache: ``conv`` (the last ``k-1`` conv inputs,
    ``[B, k-1, channels]``) and ``ssm`` (the recurrent state, fp32)."""

    __slots__ = ("conv", "ssm")

    def __init__(self, conv: torch.Tensor | None = None, ssm: torch.Tensor | None = None):
        self.conv, self.ssm = conv, ssm

    def select(self, rows: torch.Tensor) -> None:
        if self.conv is not None:
            self.conv = self.conv[rows.to(self.conv.device)]
        if self.ssm is not None:
            self.ssm = self.ssm[rows.to(self.ssm.device)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm) if t is not None)

    def __repr__(self) -> str:
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        return f"RecurrentState(conv={shape(self.conv)}, ssm={shape(self.ssm)})"


def _layer_state(ctx: Any, layer_idx: int) -> RecurrentState | None:
    if ctx.segments is not None:
        raise ValueError(
            "packed sequences (position_ids restarting inside a row) are not supported by the recurrent "
            "deltanet / mamba2 operators: give one sequence per row (padding is fine)"
        )
    if ctx.cache is None:
        return None
    st = ctx.cache.layers[layer_idx]
    if st is None:
        st = ctx.cache.layers[layer_idx] = RecurrentState()
    return st


def causal_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: RecurrentState | None) -> torch.Tensor:
    """Causal depthwise conv of ``x`` ``[B, T, C]`` with ``weight`` ``[C, 1, k]`` continuing ``state.conv`` (zeros
    when absent); updates ``state.conv`` to the last ``k-1`` inputs. Returns the pre-activation ``[B, T, C]``."""
    bsz, t, c = x.shape
    k = weight.shape[-1]
    prev = state.conv if state is not None else None
    window = torch.cat([prev.to(x.dtype), x], 1) if prev is not None else F.pad(x, (0, 0, k - 1, 0))
    if state is not None:
        state.conv = window[:, window.shape[1] - (k - 1):].detach().clone()
    w = weight.to(x.dtype)
    if t == 1:  # decode: one dot product per channel
        y = (window * w[:, 0, :].t()).sum(1, keepdim=True)
    else:
        y = F.conv1d(window.transpose(1, 2), w, groups=c).transpose(1, 2)
    return y + bias.to(y.dtype) if bias is not None else y


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------- delta rule


def delta_rule_recurrent(q, k, v, beta, initial_state=None, scale: float | None = None):
    """The delta rule token by token. ``q, k`` ``[B, H, T, dk]``, ``v`` ``[B, H, T, dv]``, ``beta`` ``[B, H, T]``;
    state ``[B, H, dk, dv]``. Returns (output ``[B, H, T, dv]``, final state); computed in fp32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    q, k, v, beta = q.float() * scale, k.float(), v.float(), beta.float()
    s = initial_state.float() if initial_state is not None else q.new_zeros(b, h, dk, dv)
    outs = []
    for i in range(t):
        kt = k[:, :, i, None, :]  # [B, H, 1, dk]
        u = beta[:, :, i, None, None] * (v[:, :, i, None, :] - kt @ s)  # [B, H, 1, dv]
        s = s + kt.transpose(-1, -2) @ u
        outs.append(q[:, :, i, None, :] @ s)
    return torch.cat(outs, 2), s


def delta_rule_chunked(q, k, v, beta, initial_state=None, chunk_size: int = 64, scale: float | None = None):
    """The delta rule over chunks (WY form): within a chunk the corrected values ``U - W S`` come from one
    unit-lower-triangular solve, between chunks the state is carried. Same arguments and result as
    :func:`delta_rule_recurrent`; equal to it up to rounding for any length."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    c = chunk_size
    pad = (-t) % c
    q, k, v, beta = q.float() * scale, k.float(), v.float(), beta.float()
    if pad:  # zero keys and beta: padded steps leave the state unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
    n = (t + pad) // c
    q, k, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(b, h, n, c, 1)
    kb = k * beta
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    a = eye + (kb @ k.transpose(-1, -2)).tril(-1)  # I + tril(diag(beta) K K^T, -1)
    wu = torch.linalg.solve_triangular(a, torch.cat([kb, v * beta], -1), upper=False, unitriangular=True)
    w, u = wu.split([dk, dv], -1)  # one solve for both right-hand sides
    qk = (q @ k.transpose(-1, -2)).tril()
    s = initial_state.float() if initial_state is not None else q.new_zeros(b, h, dk, dv)
    outs = []
    for i in range(n):
        ui = u[:, :, i] - w[:, :, i] @ s
        outs.append(q[:, :, i] @ s + qk[:, :, i] @ ui)
        s = s + k[:, :, i].transpose(-1, -2) @ ui
    o = torch.stack(outs, 2).reshape(b, h, n * c, dv)
    return o[:, :, :t], s


@register_operator("deltanet")
class DeltaNet(nn.Module):
    """DeltaNet token mixer (delta rule with short convs, L2-normed q/k, sigmoid beta, per-head output RMSNorm)."""

    module_name = "gla"

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        x = config.extra
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = int(x.get("deltanet_heads", config.num_attention_heads))
        if d % self.num_heads:
            raise ValueError(f"deltanet: hidden_size={d} is not divisible by deltanet_heads={self.num_heads}")
        self.head_dim = d // self.num_heads
        self.chunk_size = int(x.get("deltanet_chunk_size", 64))
        k = int(x.get("deltanet_conv", 4))
        self.q_proj = Linear(d, d, bias=False)
        self.k_proj = Linear(d, d, bias=False)
        self.v_proj = Linear(d, d, bias=False)
        self.b_proj = Linear(d, self.num_heads, bias=False)
        self.q_conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=False)
        self.k_conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=False)
        self.v_conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=False)
        self.o_norm = RMSNorm(self.head_dim, float(x.get("deltanet_norm_eps", 1e-5)))
        self.o_proj = Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        bsz, t, d = x.shape
        st = _layer_state(ctx, self.layer_idx)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        if ctx.pad_mask is not None:  # padding never enters the conv windows
            qkv = qkv * ctx.pad_mask[..., None].to(qkv.dtype)
        w = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], 0)
        qkv = F.silu(causal_dwconv(qkv, w, None, st))
        h, hd = self.num_heads, self.head_dim
        q, k, v = (z.reshape(bsz, t, h, hd).transpose(1, 2) for z in qkv.split(d, -1))
        q, k = _l2norm(q.float()), _l2norm(k.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        if ctx.pad_mask is not None:  # the state passes through padding unchanged
            beta = beta * ctx.pad_mask[..., None].to(beta.dtype)
        beta = beta.transpose(1, 2)
        s0 = st.ssm if st is not None else None
        if t == 1:
            o, s = delta_rule_recurrent(q, k, v, beta, s0)
        else:
            o, s = delta_rule_chunked(q, k, v, beta, s0, self.chunk_size)
        if st is not None:
            st.ssm = s.detach()
        o = self.o_norm(o.transpose(1, 2).to(x.dtype))
        return self.o_proj(o.reshape(bsz, t, d))

    # the hybrid decoder's fast inference path (zoo.language.hybrid module docstring)
    packed_projections = {"qkvb": ("q_proj", "k_proj", "v_proj", "b_proj")}

    def step(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """One token per row: packed q/k/v/b product, conv window and delta-rule state updated in place."""
        st = ctx.cache.layers[self.layer_idx]
        if st is None or st.conv is None or st.conv.dtype != x.dtype:
            return self.forward(x, ctx)
        bsz, d, h, hd = x.shape[0], x.shape[-1], self.num_heads, self.head_dim
        q, k, v, b = packed_linear(self, "qkvb", x)
        qkv = torch.cat([q, k, v], -1)  # [B, 1, 3d]
        if ctx.pad_mask is not None:
            qkv.mul_(ctx.pad_mask[..., None].to(qkv.dtype))
        window = torch.cat([st.conv, qkv], 1)  # [B, k, 3d]
        w = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], 0)[:, 0, :].t()
        qkv = F.silu((window * w.to(x.dtype)).sum(1))  # [B, 3d]
        st.conv.copy_(window[:, 1:])
        q, k, v = (z.reshape(bsz, h, 1, hd).float() for z in qkv.split(d, -1))
        q, k = _l2norm(q) * hd**-0.5, _l2norm(k)
        beta = torch.sigmoid(b.float()).reshape(bsz, h, 1, 1)
        if ctx.pad_mask is not None:
            beta = beta * ctx.pad_mask.reshape(bsz, 1, 1, 1).to(beta.dtype)
        s = st.ssm  # [B, H, dk, dv] fp32
        u = (v - k @ s).mul_(beta)  # [B, H, 1, dv]
        s.add_(k.transpose(-1, -2) @ u)
        o = self.o_norm((q @ s).transpose(1, 2).to(x.dtype))  # [B, 1, H, dv]
        return self.o_proj(o.reshape(bsz, 1, d))

    def record_step(self, prog: Any, x: torch.Tensor, out: torch.Tensor) -> None:
        """The step above as program ops (zoo.language.hybrid, step programs)."""
        d, h, hd = out.numel(), self.num_heads, self.head_dim
        q, k, v, b = record_packed(prog, self, "qkvb", x)
        convs = [self.q_conv1d, self.k_conv1d, self.v_conv1d]
        prog.watch(self, "q_conv1d", "k_conv1d", "v_conv1d")
        for c in convs:
            prog.watch(c, "weight")
        taps = convs[0].weight.shape[-1]
        word = _recurrent_state_words(prog, self.layer_idx, (1, taps - 1, 3 * d), (1, h, hd, hd))
        o = prog.scratch("deltanet_o", d)
        qkvb = prog.scratch(("packed", "qkvb"), 3 * d + h)  # the packed output buffer (q, k, v, b are views of it)
        prog.deltanet(qkvb, word, [c.weight.detach() for c in convs], o, h)
        normed = prog.scratch("deltanet_on", d)
        record_norm(prog, self, "o_norm", o, normed)
        record_linear(prog, self, "o_proj", normed, out)


def _recurrent_state_words(prog: Any, idx: int, conv_shape: tuple, ssm_shape: tuple) -> int:
    """A program word pair filled per step with the addresses of layer ``idx``'s conv state (activation dtype) and
    fp32 state, after checking their shapes (a prefill leaves both)."""

    def fill(ctx: Any) -> tuple[int, int]:
        st = ctx.cache.layers[idx]
        if (not isinstance(st, RecurrentState) or st.conv is None or st.ssm is None or st.conv.dtype is not prog.dtype
                or tuple(st.conv.shape) != conv_shape or tuple(st.ssm.shape) != ssm_shape
                or st.ssm.dtype is not torch.float32):
            raise NotProgrammable("recurrent state")
        if not st.conv.is_contiguous():
            st.conv = st.conv.contiguous()
        if not st.ssm.is_contiguous():
            st.ssm = st.ssm.contiguous()
        return st.conv.data_ptr(), st.ssm.data_ptr()

    return prog.dynamic(2, fill)


# ---------------------------------------------------------------------------------------------- Mamba2 (SSD)


def ssd_recurrent(x, dt, a, b, c, d=None, initial_state=None):
    """Mamba2 scan token by token. ``x`` ``[B, T, H, P]``, ``dt`` ``[B, T, H]`` (after softplus), ``a`` ``[H]``
    (negative), ``b, c`` ``[B, T, G, N]``, ``d`` ``[H]``; state ``[B, H, P, N]``. Returns (y, final state), fp32."""
    bsz, t, h, p = x.shape
    g, n = b.shape[2], b.shape[3]
    x, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    b, c = b.repeat_interleave(h // g, 2), c.repeat_interleave(h // g, 2)  # groups -> heads
    s = initial_state.float() if initial_state is not None else x.new_zeros(bsz, h, p, n)
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i] * a)[..., None, None]  # [B, H, 1, 1]
        s = s * decay + (dt[:, i, :, None] * x[:, i])[..., None] * b[:, i, :, None, :]
        ys.append((s @ c[:, i, :, :, None])[..., 0])  # [B, H, P]
    y = torch.stack(ys, 1)
    if d is not None:
        y = y + x * d.float()[:, None]
    return y, s


def ssd_chunked(x, dt, a, b, c, d=None, initial_state=None, chunk_size: int = 256):
    """The SSD (state-space duality) chunked scan: within a chunk a masked, decay-weighted ``C B^T`` product, between
    chunks the state is carried. Same arguments and result as :func:`ssd_recurrent`. ``C B^T`` is formed once per
    group (not per head) and every contraction is a batched matrix product (no 6-D einsum intermediates)."""
    bsz, t, h, p = x.shape
    g, n = b.shape[2], b.shape[3]
    rep = h // g
    cs = chunk_size
    pad = (-t) % cs
    x, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    x_in = x
    if pad:  # dt = 0 on padding: no decay, no input
        x, b, c = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (x, b, c))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (t + pad) // cs
    # layouts: heads as [g, rep], time last-but-one -> [B, nc, g, rep, cs, *]
    xg = x.reshape(bsz, nc, cs, g, rep, p).permute(0, 1, 3, 4, 2, 5)
    bg = b.reshape(bsz, nc, cs, g, n).permute(0, 1, 3, 2, 4)[:, :, :, None]  # [B, nc, g, 1, cs, n]
    cg = c.reshape(bsz, nc, cs, g, n).permute(0, 1, 3, 2, 4)[:, :, :, None]
    dtg = dt.reshape(bsz, nc, cs, g, rep).permute(0, 1, 3, 4, 2)  # [B, nc, g, rep, cs]
    acs = torch.cumsum(dtg * a.reshape(g, rep, 1), -1)  # cumulative log decay inside each chunk
    xdt = xg * dtg[..., None]
    # intra-chunk: y_t += sum_{s<=t} exp(acs_t - acs_s) (C_t . B_s) dt_s x_s
    decay = torch.exp((acs[..., :, None] - acs[..., None, :]).clamp_max(0)).tril()  # [B, nc, g, rep, cs, cs]
    scores = cg @ bg.transpose(-1, -2)  # [B, nc, g, 1, cs, cs]: once per group
    y = (scores * decay) @ xdt  # [B, nc, g, rep, cs, p]
    # what each chunk adds to the state at its end: sum_s exp(acs_end - acs_s) dt_s x_s B_s^T
    to_end = torch.exp(acs[..., -1:] - acs)  # [B, nc, g, rep, cs]
    chunk_states = (xdt * to_end[..., None]).transpose(-1, -2) @ bg  # [B, nc, g, rep, p, n]
    chunk_decay = torch.exp(acs[..., -1])  # [B, nc, g, rep]
    s = initial_state.float() if initial_state is not None else x.new_zeros(bsz, h, p, n)
    s = s.reshape(bsz, g, rep, p, n)
    inter = []
    for i in range(nc):
        inter.append((cg[:, i] @ s.transpose(-1, -2)) * torch.exp(acs[:, i])[..., None])  # [B, g, rep, cs, p]
        s = s * chunk_decay[:, i, ..., None, None] + chunk_states[:, i]
    y = y + torch.stack(inter, 1)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(bsz, nc * cs, h, p)[:, :t]
    if d is not None:
        y = y + x_in * d.float()[:, None]
    return y, s.reshape(bsz, h, p, n)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1):
    """``weight * rmsnorm(y * silu(z))`` with the norm taken over ``groups`` equal slices (norm after the gate)."""
    dtype = y.dtype
    h = y.float() * F.silu(z.float())
    h = h.unflatten(-1, (groups, -1))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.flatten(-2).to(dtype)


def mamba2_dims(config: Any) -> dict[str, int]:
    """Inner sizes of the Mamba2 mixer for a config: d_inner, d_state, ngroups, headdim, nheads, conv_dim, in_proj."""
    x = config.extra
    d_inner = int(x.get("mamba_d_inner") or int(x.get("mamba_expand", 2) * config.hidden_size))
    d_state, groups, headdim = int(x.get("mamba_d_state", 128)), int(x.get("mamba_ngroups", 1)), int(
        x.get("mamba_headdim", 64))
    if d_inner % headdim:
        raise ValueError(f"mamba2: inner size {d_inner} is not a multiple of mamba_headdim={headdim}")
    nheads = d_inner // headdim
    if nheads % groups:
        raise ValueError(f"mamba2: {nheads} heads are not divisible by mamba_ngroups={groups}")
    conv_dim = d_inner + 2 * groups * d_state
    return dict(d_inner=d_inner, d_state=d_state, ngroups=groups, headdim=headdim, nheads=nheads,
                conv_dim=conv_dim, in_proj=d_inner + conv_dim + nheads)


@register_operator("mamba2")
@register_operator("m2")
class Mamba2(nn.Module):
    """Mamba2 token mixer (SSD), parameter names of mamba_ssm / transformers (``in_proj``, ``conv1d``, ``dt_bias``,
    ``A_log``, ``D``, ``norm``, ``out_proj``)."""

    module_name = "mamba"

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        x = config.extra
        dims = mamba2_dims(config)
        self.layer_idx = layer_idx
        self.d_inner, self.d_state = dims["d_inner"], dims["d_state"]
        self.ngroups, self.headdim, self.nheads = dims["ngroups"], dims["headdim"], dims["nheads"]
        self.conv_dim = dims["conv_dim"]
        self.chunk_size = int(x.get("mamba_chunk_size", 256))
        self.norm_eps = float(x.get("mamba_norm_eps", 1e-5))
        k = int(x.get("mamba_d_conv", 4))
        bias = bool(x.get("mamba_proj_bias", False))
        d = config.hidden_size
        self.in_proj = Linear(d, dims["in_proj"], bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim, padding=k - 1,
                                bias=bool(x.get("mamba_conv_bias", True)))
        # mamba_ssm's initialisation: dt in [1e-3, 1e-1] log-uniformly (stored as softplus^-1), A in [1, 16]
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(self.d_inner, self.norm_eps)  # the gated norm's weight (key ``norm.weight``)
        self.out_proj = Linear(self.d_inner, d, bias=bias)

    def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        bsz, t, _ = x.shape
        st = _layer_state(ctx, self.layer_idx)
        zxbcdt = self.in_proj(x)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], -1)
        if ctx.pad_mask is not None:
            xbc = xbc * ctx.pad_mask[..., None].to(xbc.dtype)
        xbc = F.silu(causal_dwconv(xbc, self.conv1d.weight, self.conv1d.bias, st))
        gn = self.ngroups * self.d_state
        xs, b, c = xbc.split([self.d_inner, gn, gn], -1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if ctx.pad_mask is not None:
            dt = dt * ctx.pad_mask[..., None].to(dt.dtype)
        a = -torch.exp(self.A_log.float())
        xs = xs.reshape(bsz, t, self.nheads, self.headdim)
        b = b.reshape(bsz, t, self.ngroups, self.d_state)
        c = c.reshape(bsz, t, self.ngroups, self.d_state)
        s0 = st.ssm if st is not None else None
        if t == 1:
            y, s = ssd_recurrent(xs, dt, a, b, c, self.D, s0)
        else:
            y, s = ssd_chunked(xs, dt, a, b, c, self.D, s0, self.chunk_size)
        if st is not None:
            st.ssm = s.detach()
        y = gated_rms_norm(y.reshape(bsz, t, self.d_inner), z, self.norm.weight, self.norm_eps, self.ngroups)
        return self.out_proj(y.to(x.dtype))

    def step(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """One token per row (the hybrid decoder's fast path): conv window and SSM state updated in place."""
        st = ctx.cache.layers[self.layer_idx]
        if st is None or st.conv is None or st.conv.dtype != x.dtype:
            return self.forward(x, ctx)
        bsz = x.shape[0]
        z, xbc, dt = self.in_proj(x)[:, 0].split([self.d_inner, self.conv_dim, self.nheads], -1)
        if ctx.pad_mask is not None:
            xbc = xbc * ctx.pad_mask[:, -1:].to(xbc.dtype)
        window = torch.cat([st.conv, xbc[:, None]], 1)  # [B, k, C]
        xbc = (window * self.conv1d.weight[:, 0, :].t().to(x.dtype)).sum(1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias.to(xbc.dtype)
        st.conv.copy_(window[:, 1:])
        gn, h, p = self.ngroups * self.d_state, self.nheads, self.headdim
        xs, b, c = F.silu(xbc).float().split([self.d_inner, gn, gn], -1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, H]
        if ctx.pad_mask is not None:
            dt = dt * ctx.pad_mask[:, -1:].to(dt.dtype)
        xs = xs.reshape(bsz, h, p)
        rep = h // self.ngroups
        b = b.reshape(bsz, self.ngroups, 1, 1, self.d_state)
        c = c.reshape(bsz, self.ngroups, 1, self.d_state, 1)
        s = st.ssm.view(bsz, self.ngroups, rep, p, self.d_state)  # [B, H, P, N] fp32, grouped
        s.mul_(torch.exp(dt * -torch.exp(self.A_log.float())).view(bsz, self.ngroups, rep, 1, 1))
        s.add_((dt[..., None] * xs).view(bsz, self.ngroups, rep, p, 1) * b)
        y = (s @ c).reshape(bsz, h, p) + xs * self.D.float()[:, None]
        y = gated_rms_norm(y.reshape(bsz, 1, self.d_inner), z[:, None], self.norm.weight, self.norm_eps,
                           self.ngroups)
        return self.out_proj(y.to(x.dtype))

    def record_step(self, prog: Any, x: torch.Tensor, out: torch.Tensor) -> None:
        """The step above as program ops (zoo.language.hybrid, step programs)."""
        dims = {"d_inner": self.d_inner, "conv_dim": self.conv_dim, "nheads": self.nheads, "headdim": self.headdim,
                "d_state": self.d_state, "ngroups": self.ngroups}
        zx = prog.scratch("mamba_in", self.in_proj.out_features)
        record_linear(prog, self, "in_proj", x, zx)
        prog.watch(self, "conv1d", "norm")
        prog.watch(self.conv1d, "weight", "bias")
        prog.watch(self.norm, "weight")
        prog.watch(self, "dt_bias", "A_log", "D")
        taps = self.conv1d.weight.shape[-1]
        word = _recurrent_state_words(prog, self.layer_idx, (1, taps - 1, self.conv_dim),
                                      (1, self.nheads, self.headdim, self.d_state))
        y = prog.scratch("mamba_y", self.d_inner)
        bias = self.conv1d.bias
        prog.mamba2(zx, word, self.conv1d.weight.detach(), None if bias is None else bias.detach(),
                    self.dt_bias.detach(), self.A_log.detach(), self.D.detach(), self.norm.weight.detach(), y, dims,
                    self.norm_eps)
        record_linear(prog, self, "out_proj", y, out)


@register_operator("ffn")
class FFNOnly(SwiGLU):
    """A layer whose only sublayer is a SwiGLU (``x + SwiGLU(norm(x))``); width ``extra["ffn_size"]``."""

    module_name = "ffn"

    def __init__(self, config: Any, layer_idx: int):
        width = int(config.extra.get("ffn_size") or config.intermediate_size)
        if width <= 0:
            raise ValueError("an 'ffn' layer needs a width: set extra['ffn_size'] (or intermediate_size) > 0")
        super().__init__(config.hidden_size, width)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return super().forward(x)
