"""Image-text (CLIP) training and evaluation on any registered CLIP model (MobileCLIP / MobileCLIP2).

Training: the multi-modal reinforced loss of MobileCLIP (arXiv 2311.17049, Apple's ``DRClipLoss``)
``L = (1 - lambda) * L_CLIP + lambda * L_distill``, on (image, ground-truth caption) and again on (image, synthetic
caption) when the batch has one, the two summed. ``L_distill`` is the cross-entropy between the student's image-text
logits and the teachers' softmax targets, averaged over the teachers after the softmax; the teachers' embeddings come
stored with the data (DataCompDR), so no teacher runs during training. ``distill_weight=0`` is plain CLIP.

Evaluation (``zoo validate`` / ``zoo test``): zero-shot classification (top-1 / top-5 from text classifiers built
from class names and prompt templates) on batches ``(image, label)``, and image-text retrieval (recall@1/5/10 in
both directions) on batches that are dicts with ``image`` and ``text`` (one caption per image).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, img_all: torch.Tensor | None = None,
              txt_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE over normalised features: ``(CE(s I T^T, diag) + CE(s T I^T, diag)) / 2``.

    With ``img_all`` / ``txt_all`` (every rank's features, gathered with their gradients) this rank's rows are scored
    against the whole global batch, targets shifted by ``offset`` (this rank's first index): open_clip's
    ``--local-loss --gather-with-grad``, whose mean over ranks equals the loss of the global batch."""
    img_all = img if img_all is None else img_all
    txt_all = txt if txt_all is None else txt_all
    target = torch.arange(img.shape[0], device=img.device) + offset
    return 0.5 * (F.cross_entropy(scale * img @ txt_all.t(), target) + F.cross_entropy(scale * txt @ img_all.t(), target))


def distill_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
                 teacher_scales: Sequence[float], img_all: torch.Tensor | None = None,
                 txt_all: torch.Tensor | None = None, t_img_all: torch.Tensor | None = None,
                 t_txt_all: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student's logits against the teacher ensemble's targets, both directions, row mean.

    ``t_img`` / ``t_txt`` are the teachers' embeddings concatenated along the last axis (DataCompDR stores 2 x 768);
    teacher ``k`` uses the ``k``-th chunk, normalised, with logit scale ``teacher_scales[k]``; the targets are the mean
    of the teachers' softmaxes (``--distill-average-after-softmax``). The ``*_all`` arguments (every rank's student
    and teacher features) score this rank's rows against the global batch, as :func:`clip_loss`."""
    k = len(teacher_scales)
    img_all, txt_all = (img if img_all is None else img_all), (txt if txt_all is None else txt_all)
    t_img_all, t_txt_all = (t_img if t_img_all is None else t_img_all), (t_txt if t_txt_all is None else t_txt_all)
    p_i2t = p_t2i = 0.0
    chunks = zip(t_img.chunk(k, -1), t_txt.chunk(k, -1), t_img_all.chunk(k, -1), t_txt_all.chunk(k, -1), teacher_scales)
    for ti, tt, ti_all, tt_all, tau in chunks:
        n = functools.partial(F.normalize, dim=-1)
        p_i2t = p_i2t + (tau * n(ti.float()) @ n(tt_all.float()).t()).softmax(-1) / k
        p_t2i = p_t2i + (tau * n(tt.float()) @ n(ti_all.float()).t()).softmax(-1) / k
    s_i2t, s_t2i = scale * img @ txt_all.t(), scale * txt @ img_all.t()
    return 0.5 * (-(p_i2t * s_i2t.log_softmax(-1)).sum(-1).mean() - (p_t2i * s_t2i.log_softmax(-1)).sum(-1).mean())


def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for image->text and text->image with one caption per image (pair ``i`` matches ``i``)."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s[target, target].unsqueeze(1)).sum(1)  # how many candidates score above the right one
        for k in ks:
            out[f"{name}_r{k}"] = (rank < k).float().mean().item()
    return out


class CLIPTask(L.LightningModule):
    """Train / evaluate ``zoo.create_model(model_name, **model_args)`` as a CLIP model.

    Args:
        model_name / model_args: a registered CLIP model and its overrides (``checkpoint_path``, tower sizes, ...).
        distill_weight: lambda of ``(1 - lambda) L_CLIP + lambda L_distill`` (MobileCLIP-S*: 1.0, B: 0.75, plain: 0).
        teacher_logit_scales: one per teacher in the stored embeddings (v1: 100, 100; MobileCLIP2: 70, 60).
        classnames / templates: zero-shot classifier; default: the datamodule's ``classnames`` / ``templates``.
        lr, weight_decay, warmup_steps, betas: AdamW with linear warmup then cosine decay per step (the paper's recipe:
            lr 1e-3, wd 0.2, beta2 0.95, 1000 warmup steps).
        gather_features: under DDP, score each rank's samples against every rank's (features gathered with their
            gradients; open_clip's ``--local-loss --gather-with-grad``, the paper's setting), so the contrastive and
            distillation batch is the global one. Off: each rank's own batch.
    """

    def __init__(self, model_name: str = "mobileclip_s0", model_args: dict[str, Any] | None = None,
                 distill_weight: float = 1.0, teacher_logit_scales: Sequence[float] = (100.0, 100.0),
                 classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.2, warmup_steps: int = 1000, betas=(0.9, 0.95),
                 min_lr: float = 0.0, gather_features: bool = False):
        super().__init__()
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight={distill_weight}: lambda must lie in [0, 1]")
        self.save_hyperparameters()
        import zoo

        self.model = zoo.create_model(model_name, **dict(model_args or {}))
        # prompts are tokenized to the model's context length (a model may be built with a shorter one)
        self.tokenizer = functools.partial(zoo.get_tokenizer(model_name), context_length=self.model.context_length)
        self._classifier: torch.Tensor | None = None
        self._retrieval: dict[str, list] = {"img": [], "txt": []}

    def forward(self, image=None, text=None):
        return self.model(image, text)

    # training ---------------------------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
        """Every rank's rows of ``x`` in rank order (with their gradients when ``grad``); None off DDP."""
        if x is None or not self.hparams.gather_features or self.trainer.world_size == 1:
            return None
        return self.all_gather(x, sync_grads=grad).flatten(0, 1)

    def _pair_loss(self, img, txt, scale, t_img, t_txt) -> torch.Tensor:
        lam = self.hparams.distill_weight
        loss = 0.0
        img_all, txt_all = self._gather(img, True), self._gather(txt, True)
        offset = self.global_rank * img.shape[0] if img_all is not None else 0
        if lam < 1.0:
            loss = loss + (1 - lam) * clip_loss(img, txt, scale, img_all, txt_all, offset)
        if lam > 0.0:
            if t_img is None or t_txt is None:
                raise ValueError("distill_weight > 0 needs teacher embeddings in the batch (image_emb / text_emb): "
                                 "train on reinforced shards (zoo.data.clip_data.ReinforcedDataModule)")
            loss = loss + lam * distill_loss(img, txt, scale, t_img, t_txt, self.hparams.teacher_logit_scales,
                                             img_all, txt_all, self._gather(t_img, False), self._gather(t_txt, False))
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        img = self.model.encode_image(batch["image"], normalize=True)
        texts = [batch["text"]] + ([batch["syn_text"]] if "syn_text" in batch else [])
        txt = self.model.encode_text(torch.cat(texts), normalize=True)  # GT + synthetic captions in one batch
        scale = self.model.get_logit_scale()
        n = img.shape[0]
        loss = self._pair_loss(img, txt[:n], scale, batch.get("image_emb"), batch.get("text_emb"))
        if len(texts) > 1:
            loss = loss + self._pair_loss(img, txt[n:], scale, batch.get("image_emb"), batch.get("syn_text_emb"))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", scale, batch_size=n)
        return loss

    # evaluation -------------------------------------------------------------------------------------------
    def _zero_shot_weights(self) -> torch.Tensor:
        from zoo.vision.mobileclip import zero_shot_classifier

        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = self.hparams.classnames or getattr(dm, "classnames", None)
        templates = self.hparams.templates or getattr(dm, "templates", None) or ("a photo of a {}.",)
        if not names:
            raise ValueError("zero-shot evaluation needs class names: set model.classnames or use a datamodule that "
                             "provides them (e.g. zoo.data.clip_data.ZeroShotImageFolderDataModule)")
        return zero_shot_classifier(self.model, self.tokenizer, list(names), list(templates), device=self.device)

    def _start_eval(self) -> None:
        self._classifier = None
        self._retrieval = {"img": [], "txt": []}

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def _eval_step(self, batch, split: str) -> None:
        if isinstance(batch, dict):  # retrieval pairs
            self._retrieval["img"].append(self.model.encode_image(batch["image"], normalize=True))
            self._retrieval["txt"].append(self.model.encode_text(batch["text"], normalize=True))
            return
        x, y = batch
        if self._classifier is None:
            self._classifier = self._zero_shot_weights()
        logits = self.model.encode_image(x, normalize=True) @ self._classifier
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        n = x.shape[0]
        self.log(f"{split}/acc", (top[:, 0] == y).float().mean(), prog_bar=True, batch_size=n, sync_dist=True,
                 add_dataloader_idx=False)
        self.log(f"{split}/acc_top5", (top == y[:, None]).any(1).float().mean(), batch_size=n, sync_dist=True,
                 add_dataloader_idx=False)

    def _end_eval(self, split: str) -> None:
        if self._retrieval["img"]:
            img = self.all_gather(torch.cat(self._retrieval["img"])).reshape(-1, self.model.embed_dim)
            txt = self.all_gather(torch.cat(self._retrieval["txt"])).reshape(-1, self.model.embed_dim)
            for k, v in retrieval_recall(img, txt).items():
                self.log(f"{split}/{k}", v, sync_dist=False)
        self._retrieval = {"img": [], "txt": []}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # optimizer --------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        skip = self.model.no_weight_decay()
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or n in skip or "token_embedding" in n else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(hp.warmup_steps, total - 1) if total > 1 else 0
        floor = hp.min_lr / hp.lr if hp.lr else 0.0

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + torch.cos(torch.tensor(t * torch.pi)).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
