"""Causal language modelling on any registered zoo LM, with optional decoupled top-K knowledge distillation.

Metrics: ``train/loss`` (nats per token), ``val/loss``, ``val/ppl`` and, when the DataModule provides
``token_bytes()`` (UTF-8 bytes per token, see :class:`zoo.data.text.TextDataModule`), ``val/bpb`` -- bits per byte,
comparable across tokenizers. At the end of every validation the value is printed next to the DataModule's
``unigram_bpb`` baseline.

Distillation (LFM2 Technical Report, arXiv 2511.23404: "tempered, decoupled Top-K"): with T the teacher's top-K tokens
at a position and P(T) the probability mass a model puts on T,

    L_DTK = KL( Bern(P_T(T)) || Bern(P_S(T)) ) + P_T(T) * KL( softmax(z_T[T] / tau) || softmax(z_S[T] / tau) )

so only the top-K mass and the shape inside the top-K are matched (the teacher's tail is unknown when only K logits
are stored, and a KL on the renormalised top-K would push student mass out of the tail). The training loss is
``(1 - distill_alpha) * CE + distill_alpha * L_DTK``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

__all__ = ["CausalLM", "decoupled_topk_kd_loss", "load_causal_lm"]


def decoupled_topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int = 32,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LFM2's decoupled top-K distillation loss, averaged over positions (``mask``: True = scored).

    ``teacher_logits`` may be the full ``[..., V]`` logits or already top-K (then pass them with
    :func:`torch.topk` indices through ``(values, indices)``).
    """
    if isinstance(teacher_logits, tuple):
        t_vals, idx = teacher_logits
        t_lse = None
    else:
        t_vals, idx = teacher_logits.float().topk(k, dim=-1)
        t_lse = teacher_logits.float().logsumexp(-1)
    s = student_logits.float()
    s_top = s.gather(-1, idx)
    # binary term: mass on the teacher's top-K set
    log_pt = t_vals.logsumexp(-1) - t_lse if t_lse is not None else torch.zeros_like(t_vals[..., 0])
    log_ps = s_top.logsumexp(-1) - s.logsumexp(-1)
    pt = log_pt.exp()
    log1m_pt = torch.log1p(-pt.clamp(max=1 - 1e-6))
    log1m_ps = torch.log1p(-log_ps.exp().clamp(max=1 - 1e-6))
    bern = pt * (log_pt - log_ps) + (1 - pt) * (log1m_pt - log1m_ps)
    # conditional term inside the top-K at temperature tau
    lt = F.log_softmax(t_vals / temperature, dim=-1)
    ls = F.log_softmax(s_top / temperature, dim=-1)
    cond = (lt.exp() * (lt - ls)).sum(-1)
    loss = bern + pt * cond
    if mask is not None:
        m = mask.to(loss.dtype)
        return (loss * m).sum() / m.sum().clamp_min(1)
    return loss.mean()


def load_causal_lm(spec: str, args: dict[str, Any] | None = None) -> torch.nn.Module:
    """A causal LM from a zoo name (``args`` = create_model kwargs), an HF-layout folder, or a transformers hub id."""
    args = dict(args or {})
    import zoo

    p = Path(spec)
    if p.is_dir() and (p / "config.json").exists():
        import json

        mt = json.loads((p / "config.json").read_text()).get("model_type")
        if mt in ("lfm2", "zoo_lfm2"):
            from zoo.language.lfm2 import load_pretrained

            return load_pretrained(p, **args)
        if mt in ("nemotron_flash", "zoo_nemotron_flash"):
            from zoo.language.nemotron_flash import load_pretrained

            return load_pretrained(p, **args)
    elif zoo.is_model(spec):
        return zoo.create_model(spec, **args)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec, **args)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


class CausalLM(L.LightningModule):
    """Next-token training of ``zoo.create_model(model_name, **model_args)``.

    Args:
        model_name: a registered LM (``zoo list --task text-generation``), e.g. ``lfm2_350m``.
        model_args: architecture overrides (e.g. a small ``hidden_size`` / ``layer_types``) and create_model kwargs.
        vocab_size: output size; ``None`` takes the DataModule's ``vocab_size`` (its tokenizer) at setup.
        optimizer / lr / weight_decay / betas: timm optimizer factory settings (no decay on norms and biases).
        sched / warmup_steps / min_lr: timm scheduler stepped per update (``cosine``, ``linear``... or ``none``).
        sched_by_time: with the Trainer's ``max_time``, decay the learning rate (cosine, after ``warmup_steps``
            linear warm-up steps) by the fraction of the time budget used instead of by steps, so a run that is cut
            by the clock still ends with a fully decayed rate however fast the machine is.
        grad_checkpointing: recompute layer activations in backward (long sequences / big models).
        distill_teacher: zoo name, HF-layout folder or transformers hub id of a teacher with the same tokenizer.
        distill_args: kwargs for the teacher (zoo overrides, ``checkpoint_path``, or ``from_pretrained`` kwargs).
        distill_topk / distill_temperature / distill_alpha: the decoupled top-K loss (K, tau, weight).
        export_dir: at the end of fit write the trained model in the HF LFM2 layout (config.json, model.safetensors,
            and the DataModule's tokenizer for transformers and ``zoo generate``) here; default ``<log_dir>/hf``;
            ``""`` disables.
        weight_norm: after every optimizer step (and once before training) project the weights with the model's
            ``normalize_weights_()`` -- Nemotron-Flash's weight normalisation (``recipes/nemotron_flash``).
        fsdp_param_dtype: under ``ModelParallelStrategy`` (FSDP2, see ``recipes/lfm2/fsdp_1_2b.yaml``) the dtype the
            sharded parameters are gathered in for compute (e.g. ``bfloat16``; gradients are reduced in fp32);
            ``None`` computes in the parameters' dtype.
    """

    def __init__(
        self,
        model_name: str = "lfm2_350m",
        model_args: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        optimizer: str = "adamw",
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        sched: str = "cosine",
        warmup_steps: int = 100,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        sched_by_time: bool = False,
        grad_checkpointing: bool = False,
        compile: bool = False,
        distill_teacher: str | None = None,
        distill_args: dict[str, Any] | None = None,
        distill_topk: int = 32,
        distill_temperature: float = 1.0,
        distill_alpha: float = 0.5,
        export_dir: str | None = None,
        fsdp_param_dtype: str | None = None,
        weight_norm: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.teacher: torch.nn.Module | None = None
        self._val_sums: list[torch.Tensor] = []
        if vocab_size is not None:
            self._build(vocab_size)

    # ------------------------------------------------------------------------------------------ building
    def _build(self, vocab_size: int, special_ids: dict[str, int | None] | None = None) -> None:
        import zoo

        args = dict(self.hparams.model_args or {})
        args.setdefault("vocab_size", vocab_size)
        for k, v in (special_ids or {}).items():  # the tokenizer's pad / bos / eos, unless model_args set them
            args.setdefault(k, v)
        self.model = zoo.create_model(self.hparams.model_name, **args)
        if self.hparams.grad_checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        if self.hparams.weight_norm and not hasattr(self.model, "normalize_weights_"):
            raise ValueError(
                f"weight_norm=True needs a model with normalize_weights_() (e.g. nemotron_flash_*); "
                f"{self.hparams.model_name} has none"
            )
        if self.hparams.compile:
            self.model = torch.compile(self.model)

    def setup(self, stage: str) -> None:
        if self.model is None:
            dm = self.trainer.datamodule if self.trainer is not None else None
            v = getattr(dm, "vocab_size", None)
            if v is None:
                raise ValueError(
                    "CausalLM: vocab_size is not set and the DataModule has no vocab_size; pass model.vocab_size"
                )
            self.hparams.vocab_size = int(v)  # saved with checkpoints, so load_from_checkpoint rebuilds eagerly
            special = getattr(dm, "special_token_ids", None)
            if special:
                self.hparams.model_args = {**special, **dict(self.hparams.model_args or {})}
            self._build(int(v), special)
        if self.hparams.distill_teacher and self.teacher is None:
            teacher = load_causal_lm(self.hparams.distill_teacher, self.hparams.distill_args)
            teacher.eval().requires_grad_(False)
            object.__setattr__(self, "teacher", teacher)  # not a submodule: never saved, never optimized
        self._token_bytes = None
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "token_bytes"):
            self._token_bytes = dm.token_bytes()

    def configure_model(self) -> None:  # called after setup(); keeps the teacher on the student's device
        if self.teacher is not None:
            self.teacher.to(self.device)
        mesh = self._fsdp_mesh()
        if mesh is not None and self.model is not None and not getattr(self, "_sharded", False):
            self._shard(mesh)

    # ------------------------------------------------------------------------------------------ FSDP
    def _fsdp_mesh(self):
        """The data-parallel device mesh under Lightning's ``ModelParallelStrategy`` (FSDP2), else None."""
        if self._trainer is None:
            return None
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return None
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "CausalLM shards with FSDP only (the hybrid LMs declare no tensor-parallel plan): set "
                "trainer.strategy.init_args.tensor_parallel_size=1"
            )
        return mesh["data_parallel"]

    def _shard(self, mesh) -> None:
        """FSDP2: every decoder layer is its own shard group, the root holds the (tied) embedding and final norm."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {"mesh": mesh}
        if self.hparams.fsdp_param_dtype:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, self.hparams.fsdp_param_dtype),
                                                   reduce_dtype=torch.float32)
        net = getattr(self.model, "_orig_mod", self.model)
        layers = getattr(getattr(net, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"FSDP sharding needs a zoo LM with model.layers, got {type(net).__name__}")
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(net, **kw)
        self._sharded = True
        rank_zero_info(f"FSDP: {len(layers)} decoder layers + root sharded over {mesh.size()} data-parallel ranks")

    # ------------------------------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids, attention_mask) if attention_mask is not None else self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out

    def _normalize_weights(self) -> None:
        if self.hparams.weight_norm:
            getattr(self.model, "_orig_mod", self.model).normalize_weights_()

    def on_fit_start(self) -> None:
        self._normalize_weights()  # start on the constraint set, not only after the first step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._normalize_weights()  # after the optimizer step (idempotent between accumulation steps)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss = ce
        if self.teacher is not None:
            if next(self.teacher.parameters()).device != x.device:
                self.teacher.to(x.device)
            with torch.no_grad():
                t_logits = _logits(self.teacher, x)
            if t_logits.shape[-1] != logits.shape[-1]:
                raise ValueError(
                    f"teacher vocabulary ({t_logits.shape[-1]}) differs from the student's ({logits.shape[-1]}): "
                    f"distillation needs the same tokenizer"
                )
            kd = decoupled_topk_kd_loss(logits, t_logits, self.hparams.distill_topk, self.hparams.distill_temperature)
            a = self.hparams.distill_alpha
            loss = (1 - a) * ce + a * kd
            self.log("train/kd", kd)
            self.log("train/ce", ce)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, split: str) -> None:
        x, y = batch
        logits = self(x)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
        nbytes = self._token_bytes.to(y.device)[y].sum().float() if self._token_bytes is not None else nll.new_zeros(())
        self._val_sums.append(torch.stack([nll.detach(), nll.new_tensor(float(y.numel())), nbytes]))

    def _eval_epoch_end(self, split: str) -> None:
        if not self._val_sums:
            return
        s = torch.stack(self._val_sums).sum(0)
        self._val_sums.clear()
        s = self.all_gather(s).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else s
        nll, ntok, nbytes = s.tolist()
        loss = nll / max(ntok, 1)
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}/ppl", math.exp(min(loss, 50.0)))
        if nbytes > 0:
            bpb = nll / math.log(2) / nbytes
            self.log(f"{split}/bpb", bpb, prog_bar=True)
            dm = self.trainer.datamodule
            uni = getattr(dm, "unigram_bpb", None) if split == "val" else None
            msg = f"[{split} step {self.global_step}] bits/byte {bpb:.4f}"
            if uni:
                msg += f" | unigram {uni:.4f} | ratio {bpb / uni:.3f}"
            if not self.trainer.sanity_checking:
                rank_zero_info(msg)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(-1)

    # ------------------------------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        if self.hparams.export_dir == "" or self.trainer.fast_dev_run:
            return
        net = getattr(self.model, "_orig_mod", self.model)
        if not hasattr(net, "save_pretrained"):
            return
        state = None
        if any(type(p).__name__ == "DTensor" for p in net.parameters()):  # FSDP: gather on every rank (collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # trainer.log_dir is a broadcast under DDP/FSDP: every rank asks before rank 0 writes alone
        out = Path(self.hparams.export_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "hf")
        if not self.trainer.is_global_zero:
            return
        training = net.training
        net.save_pretrained(out, state_dict=state, tokenizer=getattr(self.trainer.datamodule, "tokenizer", None))
        net.train(training)
        rank_zero_info(f"exported {type(net).__name__} to {out} (zoo generate {out} --prompt ...)")

    # ------------------------------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        hp = self.hparams
        opt = create_optimizer_v2(self.model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                                  betas=tuple(hp.betas))
        if hp.sched in (None, "none", ""):
            return opt
        if hp.sched_by_time:
            timer = self._timer()
            if timer is None:
                raise ValueError("CausalLM(sched_by_time=True) needs trainer.max_time (the time budget to decay over)")
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: self._time_factor(timer))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched, _ = create_scheduler_v2(
            opt, sched=hp.sched, num_epochs=total, warmup_epochs=min(hp.warmup_steps, total // 2),
            warmup_lr=hp.warmup_lr, min_lr=hp.min_lr, step_on_epochs=False, updates_per_epoch=1,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _timer(self):
        from lightning.pytorch.callbacks import Timer

        return next((c for c in self.trainer.callbacks if isinstance(c, Timer) and c._duration), None)

    def _time_factor(self, timer) -> float:
        """LR multiplier: linear warm-up over steps, then cosine by the used share of the time budget."""
        hp = self.hparams
        warm = min(1.0, (self.global_step + 1) / max(1, hp.warmup_steps))
        elapsed = timer.time_elapsed("train")
        progress = min(1.0, elapsed / max(1e-9, elapsed + (timer.time_remaining("train") or 0.0)))
        floor = hp.min_lr / hp.lr
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def lr_scheduler_step(self, scheduler, metric):
        if hasattr(scheduler, "step_update"):  # timm schedulers count updates
            scheduler.step_update(num_updates=self.global_step)
        else:
            scheduler.step()
