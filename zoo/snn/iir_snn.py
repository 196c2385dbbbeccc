"""IIR-SNN: spiking VGG / ResNet trained down to one timestep (arXiv 2110.05929; code SayeedChowdhury/IIR-SNN).

"One Timestep is All You Need" (Chowdhury, Rathi, Roy; ECCV 2022 as "Towards Ultra Low Latency Spiking Neural
Networks ...") converts a trained ANN into a spiking network, trains it with surrogate gradients at T = 5 timesteps
and then Iteratively Initializes and Retrains it at fewer timesteps (5 -> 3 -> 1). This file holds the neuron, the
surrogate gradient, the networks, the ANN -> SNN conversion, the efficiency report and Dynamic Confidence
inference; ``zoo.snn.pipeline`` holds the training pipeline (Lightning) and the ``zoo snn`` command.

Neuron (reference ``VGG_SNN_STDB.forward``), per spiking layer ``l`` and timestep ``t``::

    U[t] = leak_l * U[t-1] + W_l * S_{l-1}[t]     (leak clamped to <= 1; 1 = integrate-and-fire)
    z    = U[t] / th_l - 1
    S[t] = 1[z > 0]                                (backward: dS/dz = 0.3 * max(0, 1 - |z|))
    U[t] = U[t] - th_l * 1[z > 0]                  (soft reset by subtraction; no gradient through the spike)

The image is fed to the first conv at every timestep (direct encoding) and the output is the membrane of the last
Linear accumulated over the timesteps (no spike, no division by T). The membrane state lives in local variables of
``forward``: every call starts from zero, so there is no ``reset_net`` to forget. Dropout masks are drawn once per
forward and shared by all timesteps.

One class covers both sides of the conversion: ``spiking=False`` builds the source ANN (conv + BatchNorm + ReLU,
same weight names), ``spiking=True`` (default) the SNN (biased convs, a ``lif`` module with the per-layer trainable
``threshold`` and ``leak`` scalars). :func:`convert_to_snn` folds the ANN's BatchNorms into its convs, copies the
weights and sets every threshold with the paper's percentile rule.

Timesteps: the constructor's ``timesteps`` (default 5) is the model's ``timesteps`` attribute; ``model(x,
timesteps=3)`` overrides it for one call; ``model.set_timesteps(T)`` changes it.
"""
import contextlib
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import SmallCfg, ZooModel
from zoo.layers import ConvNorm
from zoo.registry import ModelCfg, register_model

__all__ = [
    "SpikeFn", "spike", "LIFNeuron", "TimeSharedDropout", "SpikingVGG", "SpikingResNet", "convert_to_snn",
    "calibrate_thresholds", "percentile", "spike_report", "dynamic_confidence_eval", "E_MAC_PJ", "E_AC_PJ",
]

SURROGATE_SLOPE = 0.3  # `LinearSpike.gamma` of the reference code ("piecewise-linear as in Bellec et al. 2018")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # normalization of the reference code (snncifar_bnfused.py)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# Reference VGG configurations (vgg_spiking_bnfused_biasyes.py): ints are 3x3 conv widths, "A" a 2x2 average pool.
# Note the reference "VGG11" is not torchvision's VGG11 (it has 256 channels in the second conv, 8 convs, 4 pools).
VGG_CFGS: dict[str, tuple] = {
    "vgg11": (64, "A", 128, 256, "A", 512, 512, "A", 512, "A", 512, 512),
    "vgg16": (64, 64, "A", 128, 128, "A", 256, 256, 256, "A", 512, 512, 512, "A", 512, 512, 512),
}


# ---------------------------------------------------------------------------------------------------- neuron


class SpikeFn(torch.autograd.Function):
    """Heaviside of ``z = U / threshold - 1`` with the piecewise-linear surrogate ``slope * max(0, 1 - |z|)``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.slope = slope
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (z,) = ctx.saved_tensors
        return grad_out * (ctx.slope * (1.0 - z.abs()).clamp_min(0.0)), None


@torch.fx.wrap  # FX records one call (the surrogate needs real tensors to decide), traced graphs then train too
def spike(z: torch.Tensor, slope: float = SURROGATE_SLOPE) -> torch.Tensor:
    """Spikes ``1[z > 0]``; differentiable through the surrogate when autograd needs it, a plain comparison
    otherwise (so inference, TorchScript and exported graphs hold a ``Greater`` op, not a custom function)."""
    if torch.jit.is_scripting():
        return (z > 0).to(z.dtype)
    else:
        if torch.is_grad_enabled() and z.requires_grad:
            return SpikeFn.apply(z, slope)
        return (z > 0).to(z.dtype)


Monitor = Callable[["LIFNeuron", torch.Tensor, torch.Tensor], None]


class LIFNeuron(nn.Module):
    """Leaky integrate-and-fire with a trainable per-layer threshold and leak (scalars) and soft reset.

    ``forward(current, mem)`` takes the synaptic current of this timestep and the membrane left by the previous one
    (``None`` at the first timestep) and returns ``(spikes, membrane)``. The leak is used clamped to ``<= 1``
    (:meth:`effective_leak`); like the reference, training also clamps the parameter itself after every optimizer
    step (:meth:`SpikingNet.clamp_leak_`, called by ``zoo.snn.pipeline.IIRClassification``).
    """

    def __init__(self, threshold: float = 1.0, leak: float = 1.0, surrogate_slope: float = SURROGATE_SLOPE):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.leak = nn.Parameter(torch.tensor(float(leak)))
        self.surrogate_slope = surrogate_slope
        self.monitor: Monitor | None = None  # set by SpikingNet.monitor(); sees (self, current, spikes)

    def effective_leak(self) -> torch.Tensor:
        """``min(leak, 1)`` in value with the gradient of ``leak`` (a plain clamp has zero gradient at the leak's
        initial value 1.0, which would freeze it)."""
        return self.leak - (self.leak - 1.0).clamp(min=0.0).detach()

    def forward(self, current: torch.Tensor, mem: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        u = current if mem is None else self.effective_leak() * mem + current
        z = u / self.threshold - 1.0
        s = spike(z, self.surrogate_slope)
        if self.monitor is not None:
            self.monitor(self, current, s)
        # soft reset; like the reference, the reset carries gradient to the threshold but not through the spike
        u = u - self.threshold * (z > 0).to(u.dtype)
        return s, u

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.4g}, leak={self.leak.item():.4g}" if not self.threshold.is_meta else ""


class TimeSharedDropout(nn.Module):
    """Dropout whose mask is drawn at the first timestep of a forward and reused at the others (reference
    ``neuron_init``); outside the time loop (``state=None``) it is ordinary dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if state is None:
            return F.dropout(x, self.p, True)
        mask = state.get("mask")
        if mask is None:
            mask = state["mask"] = F.dropout(torch.ones_like(x), self.p, True)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ------------------------------------------------------------------------------------------------------ units


class SpikingConv(ConvNorm):
    """3x3 conv unit. ANN form: conv + BN + ReLU (+ dropout); SNN form: biased conv + LIF (+ time-shared dropout).

    Keys: ``conv.weight`` / ``norm.*`` (ANN) and ``conv.weight`` / ``conv.bias`` / ``lif.threshold`` /
    ``lif.leak`` (SNN); the ANN's ``reparameterize()`` (BN fold) gives exactly the SNN's conv keys.
    """

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, *, spiking: bool = True,
        deploy: bool = False, drop_rate: float = 0.0, static_input: bool = False, threshold: float = 1.0,
        leak: float = 1.0, surrogate_slope: float = SURROGATE_SLOPE,
    ):
        super().__init__(in_chs, out_chs, kernel_size, stride, deploy=spiking or deploy)
        if not spiking:
            self.act = nn.ReLU(inplace=True)
        self.spiking = spiking
        self.static_input = static_input  # the network input: same current at every timestep, computed once
        if spiking:
            self.lif = LIFNeuron(threshold, leak, surrogate_slope)
        self.drop = TimeSharedDropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            raise RuntimeError("SpikingConv in SNN form runs inside the network's time loop (step), not alone")
        return self.drop(self.act(self.norm(self.conv(x))))

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        if self.static_input:
            cur = state.get("current")
            if cur is None:
                cur = state["current"] = self.conv(x)
        else:
            cur = self.conv(x)
        s, state["mem"] = self.lif(cur, state.get("mem"))
        return self.drop(s, state)


class SpikingLinear(nn.Module):
    """Hidden fully connected unit (no bias, as in the reference): Linear + ReLU / LIF, then dropout."""

    def __init__(
        self, in_features: int, out_features: int, *, spiking: bool = True, drop_rate: float = 0.0,
        threshold: float = 1.0, leak: float = 1.0, surrogate_slope: float = SURROGATE_SLOPE,
    ):
        super().__init__()
        self.spiking = spiking
        self.fc = nn.Linear(in_features, out_features, bias=False)
        if spiking:
            self.lif = LIFNeuron(threshold, leak, surrogate_slope)
        else:
            self.act = nn.ReLU(inplace=True)
        self.drop = TimeSharedDropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            raise RuntimeError("SpikingLinear in SNN form runs inside the network's time loop (step), not alone")
        return self.drop(self.act(self.fc(x)))

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        s, state["mem"] = self.lif(self.fc(x), state.get("mem"))
        return self.drop(s, state)


class SpikingBasicBlock(nn.Module):
    """Residual block of the reference ``resnet_spiking_bnfused_biasconv.BasicBlock``.

    SNN form: ``s1 = LIF(conv1(x))``; ``s2 = LIF(conv2(drop(s1)) + shortcut(x))`` (the shortcut adds into the
    second membrane; a 1x1 conv when the shape changes). ANN form: the same with BatchNorm and ReLU.
    """

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, *, spiking: bool = True, deploy: bool = False,
        drop_rate: float = 0.0, threshold: float = 1.0, leak: float = 1.0, surrogate_slope: float = SURROGATE_SLOPE,
    ):
        super().__init__()
        self.spiking = spiking
        fold = spiking or deploy
        self.conv1 = ConvNorm(in_chs, out_chs, 3, stride, deploy=fold)
        self.act1 = LIFNeuron(threshold, leak, surrogate_slope) if spiking else nn.ReLU(inplace=True)
        self.drop = TimeSharedDropout(drop_rate)
        self.conv2 = ConvNorm(out_chs, out_chs, 3, 1, deploy=fold)
        self.shortcut = ConvNorm(in_chs, out_chs, 1, stride, deploy=fold) if stride != 1 or in_chs != out_chs else nn.Identity()
        self.act2 = LIFNeuron(threshold, leak, surrogate_slope) if spiking else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            raise RuntimeError("SpikingBasicBlock in SNN form runs inside the network's time loop (step), not alone")
        y = self.drop(self.act1(self.conv1(x)))
        return self.act2(self.conv2(y) + self.shortcut(x))

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        s1, state["mem1"] = self.act1(self.conv1(x), state.get("mem1"))
        s1 = self.drop(s1, state)
        s2, state["mem2"] = self.act2(self.conv2(s1) + self.shortcut(x), state.get("mem2"))
        return s2


def _run(seq: nn.Sequential, x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    """One timestep through a Sequential of units, pools and nested Sequentials; each unit keeps its own state."""
    for i, m in enumerate(seq):
        key = f"{prefix}{i}"
        if isinstance(m, nn.Sequential):
            x = _run(m, x, state, key + ".")
        elif hasattr(m, "step"):
            x = m.step(x, state.setdefault(key, {}))
        else:
            x = m(x)
    return x


# --------------------------------------------------------------------------------------------------- networks


class SpikingNet(ZooModel):
    """Time loop, timm model API and SNN utilities shared by :class:`SpikingVGG` and :class:`SpikingResNet`.

    Subclasses define ``_step(x, state) -> pre-logit spikes of one timestep`` (SNN form), ``_ann_features(x)`` (ANN
    form) and ``head``.
    """

    def _init_common(self, spiking: bool, timesteps: int, num_classes: int, in_chans: int) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.spiking = spiking
        self.in_chans = in_chans
        self.timesteps = int(timesteps)
        self.num_classes = num_classes
        self.grad_checkpointing = False

    # ---- time
    def set_timesteps(self, timesteps: int) -> None:
        if int(timesteps) < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.timesteps = int(timesteps)

    def _resolve_t(self, timesteps: Optional[int]) -> int:
        if isinstance(timesteps, torch.fx.Proxy):
            # FX tracing makes every forward argument a placeholder; the traced graph unrolls the model's own
            # timestep count (the `timesteps` attribute / constructor value), as set before tracing.
            timesteps = None
        if not self.spiking:
            if timesteps is not None:
                raise ValueError("timesteps= applies to the spiking form; this model was built with spiking=False (ANN)")
            return 1
        t = self.timesteps if timesteps is None else int(timesteps)
        if t < 1:
            raise ValueError(f"timesteps must be >= 1, got {t}")
        return t

    def iter_timesteps(self, x: torch.Tensor, timesteps: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the pre-logit spikes of every timestep (fresh state: nothing carries over between calls)."""
        if not self.spiking:
            raise ValueError("iter_timesteps needs the spiking form (spiking=True)")
        state: dict = {}
        for _ in range(self._resolve_t(timesteps)):
            yield self._step(x, state)

    def forward_features(self, x: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """ANN: pre-logit activations. SNN: pre-logit spike counts summed over the timesteps, so that
        ``forward_head`` of them is the accumulated membrane of the last layer."""
        if not self.spiking:
            self._resolve_t(timesteps)
            return self._ann_features(x)
        out = None
        for s in self.iter_timesteps(x, timesteps):
            out = s if out is None else out + s
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, timesteps))

    # ---- timm API (zoo.contract.ZooModel: get_classifier, reset_classifier keeping device/dtype)
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool:
            raise ValueError(f"{type(self).__name__} has no global pooling (global_pool={global_pool!r}): the head "
                             "reads the flattened pre-logit features")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing (BPTT keeps the "
                             "membrane history); lower the batch size or the timesteps instead")

    # ---- SNN utilities
    def lif_layers(self) -> list[tuple[str, LIFNeuron]]:
        """Spiking layers in execution order, as (module name, neuron)."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, LIFNeuron)]

    @torch.no_grad()
    def clamp_leak_(self, max_leak: float = 1.0) -> None:
        """Clamp every leak parameter to ``<= max_leak`` in place (call after each optimizer step)."""
        for _, m in self.lif_layers():
            m.leak.clamp_(max=max_leak)

    def thresholds(self) -> dict[str, float]:
        return {n: m.threshold.item() for n, m in self.lif_layers()}

    def leaks(self) -> dict[str, float]:
        return {n: m.leak.item() for n, m in self.lif_layers()}

    @contextlib.contextmanager
    def monitor(self, fn: Monitor, layers: Sequence[LIFNeuron] | None = None):
        """Call ``fn(neuron, current, spikes)`` at every neuron update inside the block."""
        targets = list(layers) if layers is not None else [m for _, m in self.lif_layers()]
        for m in targets:
            m.monitor = fn
        try:
            yield
        finally:
            for m in targets:
                m.monitor = None

    @torch.no_grad()
    def forward_dynamic(
        self, x: torch.Tensor, threshold: float, max_timesteps: int | None = None, horizon: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic Confidence inference (Li, Jones, Furber; arXiv 2303.10276): stop integrating a sample once its
        confidence passes ``threshold``.

        After ``t`` timesteps the confidence is the top softmax probability of ``O_t * horizon / t`` (``O_t`` the
        accumulated output; scaled to the ``horizon``-step output the network was trained to produce, default
        ``max_timesteps``). Finished samples leave the batch, so their remaining timesteps are not computed.
        Returns ``(output, timesteps_used)``: the accumulated output at each sample's exit and its timestep count.
        """
        if not self.spiking:
            raise ValueError("forward_dynamic needs the spiking form (spiking=True)")
        t_max = self._resolve_t(max_timesteps)
        horizon = t_max if horizon is None else horizon
        n = x.shape[0]
        out = x.new_zeros(n, self.num_classes)
        used = torch.zeros(n, dtype=torch.long, device=x.device)
        active = torch.arange(n, device=x.device)
        acc = None
        state: dict = {}
        for t in range(1, t_max + 1):
            y = self.head(self._step(x, state))
            acc = y if acc is None else acc + y
            conf = (acc * (horizon / t)).softmax(-1).amax(-1)
            done = conf >= threshold if t < t_max else torch.ones_like(conf, dtype=torch.bool)
            out[active[done]] = acc[done]
            used[active[done]] = t
            keep = ~done
            if not keep.any():
                break
            active, x, acc = active[keep], x[keep], acc[keep]
            state = _index_state(state, keep)
        return out, used


def _index_state(state: Any, keep: torch.Tensor) -> Any:
    if isinstance(state, dict):
        return {k: _index_state(v, keep) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return state[keep]
    return state


class SpikingVGG(SpikingNet):
    """VGG of the reference code (``VGG_SNN_STDB``): 3x3 convs, 2x2 average pools, two hidden FC layers.

    Args:
        cfg: a name in ``VGG_CFGS`` or a sequence of conv widths and ``"A"`` (2x2 average pool).
        fc_dims: hidden FC widths (reference: 4096, 4096).
        img_size: input side; the first FC has ``cfg[-1] * (img_size / 2**pools)**2`` inputs (CIFAR VGG16: 2048).
        spiking: SNN (True) or the source ANN with BatchNorm and ReLU (False).
        timesteps: default number of timesteps of the SNN.
        drop_rate: dropout after every conv not followed by a pool and after every hidden FC (reference: 0.2 SNN,
            0.5 for ANN training in ann_bn.py).
        threshold / leak: initial neuron parameters (reference defaults 1.0 / 1.0; 0.4 threshold from scratch).
        deploy: ANN form with BatchNorms already folded into the convs.
    """

    def __init__(
        self,
        cfg: str | Sequence[int | str] = "vgg16",
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        fc_dims: Sequence[int] = (4096, 4096),
        spiking: bool = True,
        timesteps: int = 5,
        drop_rate: float = 0.2,
        threshold: float = 1.0,
        leak: float = 1.0,
        surrogate_slope: float = SURROGATE_SLOPE,
        deploy: bool = False,
    ):
        super().__init__()
        self._init_common(spiking, timesteps, num_classes, in_chans)
        layers_cfg = tuple(VGG_CFGS[cfg] if isinstance(cfg, str) else cfg)
        self.arch_args = dict(cfg=cfg if isinstance(cfg, str) else list(cfg), num_classes=num_classes,
                              in_chans=in_chans, img_size=img_size, fc_dims=list(fc_dims), spiking=spiking,
                              timesteps=timesteps, drop_rate=drop_rate, threshold=threshold, leak=leak,
                              surrogate_slope=surrogate_slope, deploy=deploy)
        unit = dict(spiking=spiking, deploy=deploy, threshold=threshold, leak=leak, surrogate_slope=surrogate_slope)
        layers: list[nn.Module] = []
        chs, size, first = in_chans, img_size, True
        for i, v in enumerate(layers_cfg):
            if v in ("A", "a"):
                if size % 2:
                    raise ValueError(f"img_size {img_size} is not divisible by the 2x2 average pools of cfg {cfg!r}")
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
                continue
            if not isinstance(v, int):
                raise ValueError(f"VGG cfg entries are conv widths (int) or 'A' (avg pool), got {v!r}")
            before_pool = i + 1 < len(layers_cfg) and layers_cfg[i + 1] in ("A", "a")
            layers.append(SpikingConv(chs, v, 3, drop_rate=0.0 if before_pool else drop_rate,
                                      static_input=first, **unit))
            chs, first = v, False
        self.features = nn.Sequential(*layers)
        dims = [chs * size * size, *fc_dims]
        self.pre_logits = nn.Sequential(*[
            SpikingLinear(dims[i], dims[i + 1], drop_rate=drop_rate, **{k: unit[k] for k in unit if k != "deploy"})
            for i in range(len(fc_dims))
        ])
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = nn.Linear(dims[-1], num_classes, bias=False) if num_classes > 0 else nn.Identity()
        self.feature_info = []
        self._init_weights()

    def _init_weights(self) -> None:
        # reference `_initialize_weights2`: N(0, sqrt(2 / (k*k*out))) convs, zero biases, N(0, 0.01) linears
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def _step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        x = _run(self.features, x, state, "features.")
        return _run(self.pre_logits, x.flatten(1), state, "pre_logits.")

    def _ann_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.features(x).flatten(1))

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^features\.0\.", "blocks": [(r"^features\.(\d+)", None), (r"^pre_logits\.(\d+)", (99999,))]}


class SpikingResNet(SpikingNet):
    """ResNet of the reference code (``RESNET_SNN_STDB``; "RESNET20" = 3 stem convs + 8 basic blocks + 1 FC).

    Not He et al.'s CIFAR ResNet-20: a 3-conv 64-wide stem, a 2x2 average pool, stages of 64/128/256/512 channels
    (strides 1/2/2/2) and a single bias-free Linear on the flattened ``512 x 2 x 2`` map (32x32 input).
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        spiking: bool = True,
        timesteps: int = 5,
        drop_rate: float = 0.2,
        threshold: float = 1.0,
        leak: float = 1.0,
        surrogate_slope: float = SURROGATE_SLOPE,
        deploy: bool = False,
    ):
        super().__init__()
        self._init_common(spiking, timesteps, num_classes, in_chans)
        self.arch_args = dict(layers=list(layers), widths=list(widths), stem_width=stem_width,
                              num_classes=num_classes, in_chans=in_chans, img_size=img_size, spiking=spiking,
                              timesteps=timesteps, drop_rate=drop_rate, threshold=threshold, leak=leak,
                              surrogate_slope=surrogate_slope, deploy=deploy)
        unit = dict(spiking=spiking, deploy=deploy, threshold=threshold, leak=leak, surrogate_slope=surrogate_slope)
        self.stem = nn.Sequential(
            SpikingConv(in_chans, stem_width, drop_rate=drop_rate, static_input=True, **unit),
            SpikingConv(stem_width, stem_width, drop_rate=drop_rate, **unit),
            SpikingConv(stem_width, stem_width, **unit),
            nn.AvgPool2d(2, 2),
        )
        size = img_size // 2
        chs = stem_width
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(SpikingBasicBlock(chs, w, stride if j == 0 else 1, drop_rate=drop_rate, **unit))
                chs = w
            if n:
                size = (size + stride - 1) // stride
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = chs * size * size
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        self.feature_info = []
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def _step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        x = _run(self.stem, x, state, "stem.")
        return _run(self.stages, x, state, "stages.").flatten(1)

    def _ann_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).flatten(1)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem\.", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"}


# ------------------------------------------------------------------------------------------------- conversion


def percentile(t: torch.Tensor, q: float) -> float:
    """The reference's percentile: the ``1 + round(q/100 * (n - 1))``-th smallest element (nearest rank)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    flat = t.detach().reshape(-1).float()
    k = 1 + round(0.01 * float(q) * (flat.numel() - 1))
    return flat.kthvalue(k).values.item()


class _StopStep(Exception):
    """Raised by the calibration monitor once the layer being calibrated has seen its current."""


@torch.no_grad()
def calibrate_thresholds(
    snn: SpikingNet,
    images: torch.Tensor,
    percentile_q: float = 90.0,
    sim_timesteps: int = 500,
    threshold_scale: float = 1.0,
    default_threshold: float = 0.1,
) -> dict[str, float]:
    """Set every threshold with the paper's rule (reference ``find_threshold``), layer by layer.

    For layer ``l`` the SNN runs ``sim_timesteps`` timesteps on ``images`` with the thresholds already found for
    the layers before it; the threshold is the maximum over time of the ``percentile_q``-th percentile of the
    layer's input current (``W * S[t]``). Reference: one batch of 512 training images, 500 timesteps, 90th
    percentile; a layer whose percentile never exceeds 0 gets ``default_threshold`` (0.1). ``threshold_scale``
    (reference ``scaling_factor``, default 1) multiplies all thresholds at the end. Returns the thresholds.
    """
    if not snn.spiking:
        raise ValueError("calibrate_thresholds needs the spiking form; convert the ANN with convert_to_snn()")
    was_training = snn.training
    snn.eval()
    layers = snn.lif_layers()
    found: dict[str, float] = {}
    for idx, (name, neuron) in enumerate(layers):
        best = 0.0

        def record(n: LIFNeuron, current: torch.Tensor, s: torch.Tensor) -> None:
            nonlocal best
            best = max(best, percentile(current, percentile_q))
            raise _StopStep

        state: dict = {}
        # the first layer sees the same image current at every timestep: one step gives its maximum
        steps = 1 if idx == 0 else sim_timesteps
        with snn.monitor(record, [neuron]):
            for _ in range(steps):
                try:
                    snn._step(images, state)
                except _StopStep:
                    pass
        found[name] = best if best > 0 else default_threshold
        neuron.threshold.fill_(found[name])
    for name, neuron in layers:
        neuron.threshold.mul_(threshold_scale)
        found[name] *= threshold_scale
    snn.train(was_training)
    return found


@torch.no_grad()
def convert_to_snn(
    ann: SpikingNet,
    images: torch.Tensor,
    *,
    timesteps: int = 5,
    percentile_q: float = 90.0,
    sim_timesteps: int = 500,
    threshold_scale: float = 1.0,
    **snn_overrides: Any,
) -> SpikingNet:
    """ANN -> SNN initialization of IIR-SNN: fold the BatchNorms into the convs, copy the weights into the spiking
    twin of the same architecture (leaks 1.0) and set the thresholds with :func:`calibrate_thresholds` on
    ``images`` (a batch of training images). ``snn_overrides`` change SNN constructor arguments (e.g.
    ``drop_rate=0.2``: the reference trains the ANN with 0.5 and the SNN with 0.2). The ANN is left unchanged; the
    SNN is returned in the ANN's train / eval mode.
    """
    from zoo.checkpoints import load_weights
    from zoo.deploy import reparameterize

    if not isinstance(ann, SpikingNet) or ann.spiking:
        raise ValueError("convert_to_snn expects the ANN form of an IIR-SNN model (built with spiking=False)")
    folded = reparameterize(ann)  # deep copy in eval mode with every BatchNorm folded
    args = {**ann.arch_args, **snn_overrides, "spiking": True, "deploy": False, "timesteps": timesteps}
    param = next(ann.parameters())
    snn = type(ann)(**args).to(device=param.device, dtype=param.dtype)
    lif_keys = tuple(f"{n}.{p}" for n, _ in snn.lif_layers() for p in ("threshold", "leak"))
    load_weights(snn, folded.state_dict(), allow_missing=lif_keys, context="(ANN -> SNN conversion)")
    for attr in ("pretrained_cfg", "model_name"):
        if hasattr(ann, attr):
            setattr(snn, attr, getattr(ann, attr))
    calibrate_thresholds(snn, images.to(param.device, param.dtype), percentile_q, sim_timesteps, threshold_scale)
    return snn.train(ann.training)


# ------------------------------------------------------------------------------------------ efficiency report

# Energy per 32-bit floating-point operation in 45 nm CMOS (Horowitz, ISSCC 2014), the figures the IIR-SNN / DIET-SNN
# papers use for their ANN-vs-SNN comparison: multiply-accumulate 4.6 pJ, accumulate 0.9 pJ.
E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def _dense_macs(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        return out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    return m.in_features * m.out_features


@torch.no_grad()
def spike_report(
    model: SpikingNet, images: torch.Tensor | Sequence, timesteps: int | None = None,
    e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ,
) -> dict[str, Any]:
    """Per-layer spike rates and the ANN-vs-SNN compute-energy estimate of the paper's group.

    ``images``: a batch, or an iterable of batches / ``(images, labels)`` pairs. For every spiking layer: spike rate
    (spikes per neuron per timestep) and spikes per neuron per inference. For every synaptic layer (conv / Linear):
    its dense MACs per image; in the SNN its work is ``MACs x input spikes per input neuron`` accumulates (ACs),
    except the first conv, which takes the analog image (direct encoding) and does MACs — computed once per
    inference here, since its input current is the same at every timestep. Energy: ANN = sum MACs x 4.6 pJ;
    SNN = first-layer MACs x 4.6 pJ + ACs x 0.9 pJ (neuron updates, pooling and memory traffic are not counted,
    as in the paper). Returns a dict with ``layers``, ``ops`` and totals (``energy_ratio`` = ANN / SNN).
    """
    if not model.spiking:
        raise ValueError("spike_report needs the spiking form (spiking=True)")
    t = model._resolve_t(timesteps)
    was_training = model.training
    model.eval()
    lif_names = {m: n for n, m in model.lif_layers()}
    spikes = {n: 0.0 for n in lif_names.values()}
    neurons = {n: 0 for n in lif_names.values()}
    ops: dict[str, dict[str, float]] = {}
    analog = {n for n, m in model.named_modules() if getattr(m, "static_input", False)}
    analog = {f"{n}.conv" for n in analog}
    n_images = 0

    def on_spike(neuron: LIFNeuron, current: torch.Tensor, s: torch.Tensor) -> None:
        name = lif_names[neuron]
        spikes[name] += s.sum().item()
        neurons[name] = s[0].numel()

    def op_hook(name: str):
        def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            rec = ops.setdefault(name, {"macs": 0, "snn_macs": 0.0, "snn_acs": 0.0, "input_events": 0.0})
            macs = _dense_macs(m, out)
            rec["macs"] = macs
            x = inp[0]
            if name in analog:
                rec["snn_macs"] += macs * x.shape[0]
            else:  # spikes (or average-pooled spikes / spike counts): events per input neuron
                per_input = x.float().sum().item() / x[0].numel()
                rec["input_events"] += per_input
                rec["snn_acs"] += macs * per_input
        return hook

    handles = [m.register_forward_hook(op_hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    batches = [images] if isinstance(images, torch.Tensor) else images
    try:
        with model.monitor(on_spike):
            for b in batches:
                x = b[0] if isinstance(b, (list, tuple)) else b
                x = x.to(next(model.parameters()).device)
                model(x, timesteps=t)
                n_images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_images == 0:
        raise ValueError("spike_report got no images")
    layers = [
        {"name": n, "neurons": neurons[n], "spike_rate": spikes[n] / (neurons[n] * t * n_images),
         "spikes_per_neuron": spikes[n] / (neurons[n] * n_images)}
        for n in lif_names.values()
    ]
    op_rows = []
    for n, r in ops.items():
        op_rows.append({"name": n, "input": "analog" if n in analog else "spikes", "macs": int(r["macs"]),
                        "input_events_per_neuron": None if n in analog else r["input_events"] / n_images,
                        "snn_macs": r["snn_macs"] / n_images, "snn_acs": r["snn_acs"] / n_images})
    ann_macs = sum(r["macs"] for r in op_rows)
    snn_macs = sum(r["snn_macs"] for r in op_rows)
    snn_acs = sum(r["snn_acs"] for r in op_rows)
    e_ann = ann_macs * e_mac_pj
    e_snn = snn_macs * e_mac_pj + snn_acs * e_ac_pj
    total_spikes = sum(spikes.values()) / n_images
    total_neurons = sum(neurons.values())
    return {
        "timesteps": t, "images": n_images, "layers": layers, "ops": op_rows,
        "mean_spike_rate": total_spikes / (total_neurons * t),
        "ann_macs": ann_macs, "snn_macs": snn_macs, "snn_acs": snn_acs,
        "energy_ann_uj": e_ann * 1e-6, "energy_snn_uj": e_snn * 1e-6, "energy_ratio": e_ann / max(e_snn, 1e-12),
        "e_mac_pj": e_mac_pj, "e_ac_pj": e_ac_pj,
    }


# ------------------------------------------------------------------------------------------ dynamic confidence


@torch.no_grad()
def dynamic_confidence_eval(
    model: SpikingNet, batches: Sequence, thresholds: Sequence[float], max_timesteps: int | None = None,
    horizon: int | None = None,
) -> dict[str, Any]:
    """Accuracy and mean timesteps of Dynamic Confidence inference for several confidence thresholds, against the
    fixed-``max_timesteps`` result (the accuracy / latency Pareto sweep of arXiv 2303.10276).

    ``batches``: iterable of ``(images, labels)``. Each batch is simulated once for ``max_timesteps`` steps and
    every threshold's exit decisions are read off the running outputs; this gives the same exits and outputs as
    :meth:`SpikingNet.forward_dynamic` (tested), which is what to deploy.
    """
    t_max = model._resolve_t(max_timesteps)
    horizon = t_max if horizon is None else horizon
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = {th: 0 for th in thresholds}
    steps = {th: 0 for th in thresholds}
    fixed_correct = 0
    n = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            outs, acc = [], None
            for s in model.iter_timesteps(x, t_max):
                acc = model.head(s) if acc is None else acc + model.head(s)
                outs.append(acc)
            cum = torch.stack(outs)  # [T, B, C]
            ts = torch.arange(1, t_max + 1, device=device, dtype=cum.dtype).view(-1, 1, 1)
            conf = (cum * (horizon / ts)).softmax(-1).amax(-1)  # [T, B]
            fixed_correct += (cum[-1].argmax(-1) == y).sum().item()
            for th in thresholds:
                hit = conf >= th
                hit[-1] = True
                exit_idx = hit.float().argmax(0)  # first timestep whose confidence passed
                pred = cum[exit_idx, torch.arange(x.shape[0], device=device)].argmax(-1)
                correct[th] += (pred == y).sum().item()
                steps[th] += (exit_idx + 1).sum().item()
            n += x.shape[0]
    finally:
        model.train(was_training)
    return {
        "fixed": {"timesteps": t_max, "accuracy": fixed_correct / n},
        "dynamic": [{"threshold": th, "accuracy": correct[th] / n, "mean_timesteps": steps[th] / n} for th in thresholds],
        "images": n,
    }


# ------------------------------------------------------------------------------------------- checkpoint layout


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Our layout passes through; the reference code's VGG checkpoints (``VGG_SNN_STDB`` with ``threshold.tN`` /
    ``leak.lN`` ParameterDicts, and the ANN ``VGG`` of vgg_bn.py) are mapped to ours."""
    own = model.state_dict()
    if all(k in own for k in state_dict):
        return state_dict
    if not isinstance(model, SpikingVGG):
        return state_dict  # nothing else to map: load_weights reports the mismatch
    official_snn = any(k.startswith("threshold.t") for k in state_dict)
    official_ann = any(k.startswith("features.") and k.endswith(".running_mean") for k in state_dict)
    if not (official_snn or official_ann):
        return state_dict
    out: dict[str, torch.Tensor] = {}
    stride = 4 if official_ann and not official_snn else 3  # ANN: conv, bn, relu, dropout; SNN: conv, relu, dropout
    ref_idx = 0
    for our_idx, m in enumerate(model.features):
        if not isinstance(m, SpikingConv):
            continue  # the reference replaces the dropout before a pool by the pool: indices stay aligned
        if official_snn:
            out[f"features.{our_idx}.conv.weight"] = state_dict[f"features.{ref_idx}.weight"]
            if f"features.{ref_idx}.bias" in state_dict:
                out[f"features.{our_idx}.conv.bias"] = state_dict[f"features.{ref_idx}.bias"]
            out[f"features.{our_idx}.lif.threshold"] = state_dict[f"threshold.t{ref_idx}"].reshape(())
            out[f"features.{our_idx}.lif.leak"] = state_dict[f"leak.l{ref_idx}"].reshape(())
        else:
            out[f"features.{our_idx}.conv.weight"] = state_dict[f"features.{ref_idx}.weight"]
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                k = f"features.{ref_idx + 1}.{p}"
                if k in state_dict:
                    out[f"features.{our_idx}.norm.{p}"] = state_dict[k]
        ref_idx += stride
    n_feat = ref_idx
    for i in range(len(model.pre_logits)):
        out[f"pre_logits.{i}.fc.weight"] = state_dict[f"classifier.{3 * i}.weight"]
        if official_snn:
            out[f"pre_logits.{i}.lif.threshold"] = state_dict[f"threshold.t{n_feat + 3 * i}"].reshape(())
            out[f"pre_logits.{i}.lif.leak"] = state_dict[f"leak.l{n_feat + 3 * i}"].reshape(())
    out["head.weight"] = state_dict[f"classifier.{3 * len(model.pre_logits)}.weight"]
    return out


# ------------------------------------------------------------------------------------------------- registry


def _cfg(**kw: Any) -> ModelCfg:
    base = dict(
        task="image-classification", family="iir_snn", paper="2110.05929",
        license="unspecified",  # the reference repository states no license; no weights are released here
        num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0, interpolation="bilinear",
        mean=CIFAR10_MEAN, std=CIFAR10_STD, first_conv="features.0.conv", classifier="head",
    )
    return ModelCfg(**{**base, **kw})


default_cfgs = {
    "snn_vgg16": _cfg(
        metrics={"top1": 93.05},
        notes="CIFAR-10 VGG16 at T=1 (arXiv 2110.05929 abstract); CIFAR-100: 70.15. 39,921,472 weights plus 15 "
              "threshold and 15 leak scalars. Trained weights exist only on the authors' Google Drive.",
    ),
    "snn_vgg16_imagenet": _cfg(
        num_classes=1000, input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), metrics={"top1": 69.00},
        notes="ImageNet VGG16 at T=1: 69.00 (ECCV 2022 version) or 67.71 (arXiv v1 abstract). 138,348,352 weights.",
    ),
    "snn_vgg11": _cfg(notes="the reference code's VGG11 layout (not torchvision's); no published IIR-SNN result."),
    "snn_resnet20": _cfg(
        first_conv="stem.0.conv",
        notes="the reference code's RESNET20 (3-conv stem + 8 basic blocks + FC), not He et al.'s CIFAR ResNet-20.",
    ),
}


# tests/test_contract.py: one conv per stage, narrow FC layers
small_cfgs = {
    "snn_vgg16_imagenet": SmallCfg(dict(cfg=(8, "A", 16, "A"), fc_dims=(32,), img_size=16, timesteps=2), img_size=16),
    "snn_vgg*": SmallCfg(dict(cfg=(8, "A", 16, "A"), fc_dims=(32,), img_size=16, timesteps=2), img_size=16),
    "snn_resnet*": SmallCfg(dict(layers=(1, 1), widths=(8, 16), stem_width=8, img_size=16, timesteps=2), img_size=16),
}


@register_model
def snn_vgg16(**kwargs: Any) -> SpikingVGG:
    """VGG16 SNN for 32x32 inputs (CIFAR): 13 convs, 4 average pools, FC 2048-4096-4096-classes."""
    return SpikingVGG(**{"cfg": "vgg16", **kwargs})


@register_model
def snn_vgg16_imagenet(**kwargs: Any) -> SpikingVGG:
    """VGG16 SNN in the reference's ImageNet shape: a fifth pool after the last conv, FC 25088-4096-4096-1000."""
    return SpikingVGG(**{"cfg": VGG_CFGS["vgg16"] + ("A",), "img_size": 224, "num_classes": 1000, **kwargs})


@register_model
def snn_vgg11(**kwargs: Any) -> SpikingVGG:
    """VGG11 SNN of the reference code (8 convs, 4 average pools, FC 2048-4096-4096-classes at 32x32)."""
    return SpikingVGG(**{"cfg": "vgg11", **kwargs})


@register_model
def snn_resnet20(**kwargs: Any) -> SpikingResNet:
    """ResNet20 SNN of the reference code (3 stem convs + 8 basic blocks of 64-512 channels + FC)."""
    return SpikingResNet(**{"layers": (2, 2, 2, 2), **kwargs})
