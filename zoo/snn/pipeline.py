"""IIR-SNN training pipeline: ANN -> conversion -> SNN at T=5 -> retraining at 3 -> 1, and the ``zoo snn`` command.

Every stage is an ordinary Lightning CLI recipe (``recipes/snn/*.yaml``) run with :class:`IIRClassification`:

    zoo fit -c snn/digits_vgg_ann                                         # 1. the ANN (BatchNorm, ReLU)
    zoo fit -c snn/digits_vgg_snn --model.init_args.init_from=ANN.safetensors --model.init_args.timesteps=5
    zoo fit -c snn/digits_vgg_snn --model.init_args.init_from=T5.safetensors  --model.init_args.timesteps=3
    ...

``init_from`` pointing at an ANN checkpoint makes the module convert it (BN fold + percentile thresholds, on a batch
of training images) before training; pointing at an SNN checkpoint it simply starts from those weights, thresholds
and leaks. ``zoo snn pipeline`` chains the stages (the schedule, default 5,3,1, is an option), writes one folder per
stage (``model.safetensors``, Lightning checkpoints, logs, the exact recipe it ran, ``metrics.json``), skips
finished stages and resumes an interrupted one from its ``last.ckpt``, then prints the ANN / T=5 / T=3 / T=1 table,
the spike-rate / energy report, the Dynamic Confidence sweep and the ONNX parity of the T=1 network.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from zoo.tasks import ImageClassification

DEFAULT_ANN_RECIPE = "snn/digits_vgg_ann"
DEFAULT_SNN_RECIPE = "snn/digits_vgg_snn"


class IIRClassification(ImageClassification):
    """:class:`zoo.tasks.ImageClassification` for the IIR-SNN stages (ANN or SNN form of an ``snn_*`` model).

    Additions:
        timesteps: SNN timesteps for this stage (sets the model's ``timesteps``).
        init_from: checkpoint to start from. An SNN checkpoint (has thresholds) is loaded as is; an ANN checkpoint
            into an SNN model is converted first (reference ``pretrained_ann``): BatchNorms folded, thresholds from
            the ``convert_percentile`` rule simulated for ``convert_sim_timesteps`` steps on ``convert_batch_size``
            training images (reference: 90, 500, 512), all multiplied by ``convert_threshold_scale``.
        betas / amsgrad: Adam settings (reference SNN training: Adam, amsgrad, betas 0.9/0.999, lr 1e-4, no decay).
        sched="multistep": LR divided by ``1 / decay_rate`` at the ``decay_milestones`` fractions of the epochs
            (reference: /5 at 45/70/90 % for the ANN, 60/80/90 % for the SNN); other values go to timm's factory.
        After every optimizer step the leaks are clamped to <= 1 (reference training loop).
    """

    def __init__(
        self,
        model_name: str = "snn_vgg16",
        model_args: dict[str, Any] | None = None,
        num_classes: int = 10,
        timesteps: int | None = None,
        init_from: str | None = None,
        convert_percentile: float = 90.0,
        convert_sim_timesteps: int = 500,
        convert_batch_size: int = 512,
        convert_threshold_scale: float = 1.0,
        optimizer: str = "adam",
        lr: float = 1e-4,
        lr_base_batch: int | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        amsgrad: bool = True,
        sched: str = "multistep",
        decay_milestones: Sequence[float] = (0.6, 0.8, 0.9),
        decay_rate: float = 0.2,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        compile: bool = False,
    ):
        args = dict(model_args or {})
        spiking = args.get("spiking", True)
        if timesteps is not None:
            if not spiking:
                raise ValueError("IIRClassification: timesteps= is for the SNN form; model_args has spiking: false")
            args["timesteps"] = timesteps
        super().__init__(
            model_name=model_name, model_args=args, num_classes=num_classes, optimizer=optimizer, lr=lr,
            lr_base_batch=lr_base_batch, weight_decay=weight_decay, momentum=momentum, sched=sched,
            warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr, label_smoothing=label_smoothing,
            mixup=mixup, cutmix=cutmix, mixup_prob=mixup_prob, compile=compile,
        )
        self.save_hyperparameters()
        self._pending_ann: dict[str, torch.Tensor] | None = None
        if init_from:
            self._init_from(init_from)

    # ---- initialization
    def _init_from(self, path: str) -> None:
        from zoo import checkpoints
        from zoo.factory import load_into

        sd = checkpoints.clean_state_dict(checkpoints.load_file(path))
        is_snn_ckpt = any(k.endswith(".threshold") or k.startswith("threshold.") for k in sd)
        if getattr(self.model, "spiking", False) and not is_snn_ckpt:
            self._pending_ann = sd  # converted in setup(), where the training data and the device are known
        else:
            load_into(self.model, sd, self.hparams.model_name, num_classes=self.hparams.num_classes, where=path)

    def setup(self, stage: str) -> None:
        if self._pending_ann is None:
            return
        trainer = self.trainer
        if trainer.ckpt_path:  # resuming: the Lightning checkpoint holds the converted and trained weights
            self._pending_ann = None
            return
        self.convert_from_ann(self._pending_ann, self._calibration_images(trainer.datamodule),
                              device=trainer.strategy.root_device)
        self._pending_ann = None

    def _calibration_images(self, dm) -> torch.Tensor:
        if dm is None:
            raise ValueError("converting an ANN needs training images: run with a datamodule")
        dataset = dm.train_dataloader().dataset
        g = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.hparams.convert_batch_size, shuffle=True, generator=g)
        batch = next(iter(loader))
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    @torch.no_grad()
    def convert_from_ann(self, ann_state: dict[str, torch.Tensor], images: torch.Tensor, device=None) -> dict[str, float]:
        """Load an ANN state dict into the ANN twin of this model, convert it and copy the SNN into ``self.model``."""
        import zoo
        from zoo.factory import load_into
        from zoo.snn.iir_snn import convert_to_snn

        hp = self.hparams
        ann_args = {k: v for k, v in (hp.model_args or {}).items() if k != "timesteps"}
        ann_args["spiking"] = False
        ann = zoo.create_model(hp.model_name, num_classes=hp.num_classes, **ann_args)
        load_into(ann, ann_state, hp.model_name, num_classes=hp.num_classes, where="init_from (ANN)")
        device = device or torch.device("cpu")
        snn = convert_to_snn(
            ann.to(device).eval(), images.to(device), timesteps=self.model.timesteps,
            percentile_q=hp.convert_percentile, sim_timesteps=hp.convert_sim_timesteps,
            threshold_scale=hp.convert_threshold_scale, drop_rate=self.model.arch_args["drop_rate"],
        )
        self.model.load_state_dict(snn.state_dict())  # copies into this model's tensors, on their device
        return snn.thresholds()

    # ---- optimization
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        hp = self.hparams
        lr = hp.lr * self._global_batch_size() / hp.lr_base_batch if hp.lr_base_batch else hp.lr
        extra: dict[str, Any] = {}
        if hp.optimizer.lower() in ("adam", "adamw"):
            extra = {"betas": tuple(hp.betas), "amsgrad": hp.amsgrad}
        opt = create_optimizer_v2(self.model, opt=hp.optimizer, lr=lr, weight_decay=hp.weight_decay,
                                  momentum=hp.momentum, **extra)
        if hp.sched == "multistep":
            epochs = max(1, self.trainer.max_epochs or 1)
            milestones = sorted({max(1, int(f * epochs)) for f in hp.decay_milestones})
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=hp.decay_rate)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.sched in (None, "none", ""):
            return opt
        from timm.scheduler import create_scheduler_v2

        epochs = max(1, self.trainer.max_epochs or 1)
        updates = max(1, self.trainer.estimated_stepping_batches // epochs)
        sched, _ = create_scheduler_v2(opt, sched=hp.sched, num_epochs=epochs, warmup_epochs=hp.warmup_epochs,
                                       warmup_lr=hp.warmup_lr, min_lr=hp.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            scheduler.step()
        else:
            super().lr_scheduler_step(scheduler, metric)

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        if getattr(self.model, "spiking", False):
            self.model.clamp_leak_()
        return out


# ------------------------------------------------------------------------------------------------- pipeline


def _stage_recipe(recipe: str, stage_dir: Path, init_from: Path | None, timesteps: int | None,
                  max_epochs: int | None) -> Path:
    """Write the recipe a stage runs: the template with this stage's folder, init and timesteps filled in."""
    import yaml

    from zoo.recipes import resolve_recipe

    cfg = yaml.safe_load(resolve_recipe(recipe).read_text())
    model = cfg.get("model", {})
    if model.get("class_path") not in ("zoo.snn.pipeline.IIRClassification", "zoo.snn.IIRClassification"):
        raise ValueError(f"{recipe}: the IIR-SNN pipeline needs model.class_path zoo.snn.pipeline.IIRClassification")
    init = model.setdefault("init_args", {})
    if init_from is not None:
        init["init_from"] = str(init_from)
    if timesteps is not None:
        init["timesteps"] = timesteps
    tr = cfg.setdefault("trainer", {})
    tr["default_root_dir"] = str(stage_dir)
    tr["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(stage_dir), "name": "logs"}}
    if max_epochs is not None:
        tr["max_epochs"] = max_epochs
    callbacks = [c for c in tr.get("callbacks") or [] if not str(c.get("class_path", "")).endswith("ModelCheckpoint")]
    callbacks.insert(0, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(stage_dir / "checkpoints"), "monitor": "val/acc", "mode": "max", "save_last": True,
        "filename": "best"}})
    tr["callbacks"] = callbacks
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy over all images (micro average)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(-1) == y.to(device)).sum().item()
        total += y.numel()
    model.train(was_training)
    return correct / max(total, 1)


def run_stage(name: str, recipe: str, out_dir: str | Path, *, init_from: Path | None = None,
              timesteps: int | None = None, max_epochs: int | None = None, cli_args: Sequence[str] = ()) -> dict:
    """Train one stage (or reuse it when its ``model.safetensors`` exists; resume it from ``last.ckpt``), then test
    its best-validation weights and write them to ``OUT/NAME/model.safetensors``. Returns the stage's metrics."""
    from zoo import checkpoints
    from zoo.training import run_lightning_cli

    stage_dir = Path(out_dir) / name
    final, metrics_path = stage_dir / "model.safetensors", stage_dir / "metrics.json"
    if final.exists() and metrics_path.exists():
        return {**json.loads(metrics_path.read_text()), "reused": True}
    cfg_path = _stage_recipe(recipe, stage_dir, init_from, timesteps, max_epochs)
    argv = ["fit", "-c", str(cfg_path), *cli_args]
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        argv.append(f"--ckpt_path={last}")
    start = time.perf_counter()
    cli = run_lightning_cli(argv)
    module, trainer = cli.model, cli.trainer
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        module.model.load_state_dict(checkpoints.clean_state_dict(checkpoints.load_file(best)))
    net = module.model
    train_wall = time.perf_counter() - start
    cli.datamodule.setup("test")
    test_acc = evaluate(net, cli.datamodule.test_dataloader())
    metrics = {
        "stage": name, "timesteps": getattr(net, "timesteps", None) if getattr(net, "spiking", False) else None,
        "test_acc": test_acc, "epochs": trainer.current_epoch, "global_step": trainer.global_step, "wall_s": train_wall,
        "init_from": str(init_from) if init_from else None, "best_checkpoint": best,
    }
    if getattr(net, "spiking", False):
        metrics["thresholds"] = net.thresholds()
        metrics["leaks"] = net.leaks()
    model_args = dict(module.hparams.model_args or {})
    if getattr(net, "spiking", False):
        model_args["timesteps"] = net.timesteps
    meta = {"model_name": module.hparams.model_name, "model_args": json.dumps(model_args),
            "num_classes": str(module.hparams.num_classes), "stage": name}
    checkpoints.save_file({k: v.cpu() for k, v in net.state_dict().items()}, final, metadata=meta)
    data = cli.config.get(cli.subcommand, cli.config).get("data") if cli.subcommand else cli.config.get("data")
    data = data.as_dict() if hasattr(data, "as_dict") else data
    (stage_dir / "data.json").write_text(json.dumps(data, indent=1, default=str))  # with the CLI overrides
    metrics_path.write_text(json.dumps(metrics, indent=1))  # last: marks the stage as finished
    return metrics


def run_pipeline(
    ann_recipe: str = DEFAULT_ANN_RECIPE,
    snn_recipe: str = DEFAULT_SNN_RECIPE,
    schedule: Sequence[int] = (5, 3, 1),
    out_dir: str | Path = "runs/iir_snn_digits",
    ann_epochs: int | None = None,
    snn_epochs: Sequence[int | None] | int | None = None,
    cli_args: Sequence[str] = (),
    report: bool = True,
    dynamic_thresholds: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
    onnx: bool = True,
) -> dict[str, Any]:
    """Run ANN -> SNN(schedule[0]) -> SNN(schedule[1]) -> ..., each SNN stage initialized from the one before
    (the first from the ANN through conversion). Returns the stage metrics and, with ``report``, the efficiency,
    Dynamic Confidence and ONNX results (also written to ``OUT/report.json``)."""
    schedule = [int(t) for t in schedule]
    if not schedule or any(t < 1 for t in schedule):
        raise ValueError(f"schedule must be a non-empty list of timesteps >= 1, got {schedule}")
    if sorted(schedule, reverse=True) != schedule:
        raise ValueError(f"IIR retrains at decreasing timesteps (e.g. 5,3,1); got {schedule}")
    if snn_epochs is None or isinstance(snn_epochs, int):
        snn_epochs = [snn_epochs] * len(schedule)
    if len(snn_epochs) != len(schedule):
        raise ValueError(f"snn_epochs has {len(snn_epochs)} entries for a schedule of {len(schedule)} stages")
    out = Path(out_dir)
    results: dict[str, Any] = {"stages": []}
    ann = run_stage("ann", ann_recipe, out, max_epochs=ann_epochs, cli_args=cli_args)
    results["stages"].append(ann)
    prev = out / "ann" / "model.safetensors"
    for t, ep in zip(schedule, snn_epochs):
        name = f"snn_t{t}"
        m = run_stage(name, snn_recipe, out, init_from=prev, timesteps=t, max_epochs=ep, cli_args=cli_args)
        results["stages"].append(m)
        prev = out / name / "model.safetensors"
    if report:
        results.update(_report(out, snn_recipe, schedule, dynamic_thresholds, onnx))
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _load_stage_model(out: Path, stage: str):
    import zoo
    from zoo import checkpoints
    from safetensors import safe_open

    path = out / stage / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = zoo.create_model(meta["model_name"], num_classes=int(meta["num_classes"]), **json.loads(meta["model_args"]))
    checkpoints.load_weights(model, checkpoints.load_file(path), context=str(path))
    metrics = out / stage / "metrics.json"
    if getattr(model, "spiking", False) and metrics.exists():
        model.set_timesteps(json.loads(metrics.read_text())["timesteps"])
    return model.eval()


def _test_batches(out: Path, stage: str, snn_recipe: str) -> list:
    """The test set as the stage saw it: the data config it ran with (CLI overrides included), else the recipe's."""
    import importlib

    import yaml

    from zoo.recipes import resolve_recipe

    saved = out / stage / "data.json"
    cfg = json.loads(saved.read_text()) if saved.exists() else yaml.safe_load(resolve_recipe(snn_recipe).read_text())["data"]
    mod, cls = cfg["class_path"].rsplit(".", 1)
    dm = getattr(importlib.import_module(mod), cls)(**(cfg.get("init_args") or {}))
    dm.setup("test")
    return list(dm.test_dataloader())


def _report(out: Path, snn_recipe: str, schedule: Sequence[int], thresholds: Sequence[float], onnx: bool) -> dict:
    from zoo.snn.iir_snn import dynamic_confidence_eval, spike_report

    batches = _test_batches(out, f"snn_t{schedule[-1]}", snn_recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rep: dict[str, Any] = {"efficiency": {}}
    for t in schedule:
        model = _load_stage_model(out, f"snn_t{t}").to(device)
        rep["efficiency"][f"snn_t{t}"] = spike_report(model, batches)
    t0 = schedule[0]
    if t0 > 1:
        model = _load_stage_model(out, f"snn_t{t0}").to(device)
        rep["dynamic_confidence"] = dynamic_confidence_eval(model, batches, thresholds)
    if onnx and schedule[-1] == 1:
        rep["onnx"] = onnx_check(_load_stage_model(out, "snn_t1"), out / "snn_t1.onnx", batches)
    return rep


@torch.no_grad()
def onnx_check(model, path: Path, batches: Sequence) -> dict[str, Any]:
    """Export with ``zoo.deploy.export`` (its parity check must pass on a 3-image batch), then compare onnxruntime
    with eager on every test image. A spiking network is discontinuous: a membrane within float rounding of its
    threshold can spike in one runtime and not the other, so the whole-set figures are reported, not asserted."""
    import onnxruntime as ort

    from zoo.deploy import export

    x = batches[0][0][:2]
    path = export(model, path, example_input=x, check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    full = torch.cat([b[0] for b in batches])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: full.numpy()})[0])
    ref = model(full)
    diff = (got - ref).abs().amax(-1)
    return {"path": str(path), "images": full.shape[0], "max_abs_err": diff.max().item(),
            "identical_outputs": (diff <= 1e-4 * ref.abs().max().item()).float().mean().item(),
            "same_prediction": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def format_report(res: dict[str, Any]) -> str:
    stages = res["stages"]
    ann_acc = stages[0]["test_acc"]
    lines = ["IIR-SNN pipeline (test accuracy)", f"{'stage':<10}{'T':>3}{'top1 %':>9}{'vs ANN':>9}{'epochs':>8}{'wall s':>9}"]
    for s in stages:
        t = s.get("timesteps") or "-"
        d = "" if s["stage"] == "ann" else f"{100 * (s['test_acc'] - ann_acc):+.2f}"
        lines.append(f"{s['stage']:<10}{t!s:>3}{100 * s['test_acc']:>9.2f}{d:>9}{s['epochs']:>8}{s['wall_s']:>9.1f}"
                     + ("  (reused)" if s.get("reused") else ""))
    eff = res.get("efficiency") or {}
    if eff:
        lines += ["", "efficiency (test set): mean spike rate per neuron per timestep; energy ANN/SNN "
                  "(4.6 pJ MAC, 0.9 pJ AC)"]
        for name, r in eff.items():
            lines.append(f"  {name:<8} rate {r['mean_spike_rate']:.4f}  ACs {r['snn_acs'] / 1e6:8.3f}M  "
                         f"MACs {r['snn_macs'] / 1e6:7.3f}M (ANN {r['ann_macs'] / 1e6:.3f}M)  energy ratio {r['energy_ratio']:.2f}x")
        last = list(eff)[-1]
        lines.append(f"  per-layer spike rates of {last}: " + ", ".join(
            f"{l['name'].replace('.lif', '')}={l['spike_rate']:.3f}" for l in eff[last]["layers"]))
    dc = res.get("dynamic_confidence")
    if dc:
        lines += ["", f"Dynamic Confidence on the T={dc['fixed']['timesteps']} SNN: fixed T -> "
                  f"{100 * dc['fixed']['accuracy']:.2f} %"]
        for r in dc["dynamic"]:
            lines.append(f"  threshold {r['threshold']:<5} mean T {r['mean_timesteps']:.2f}  top1 {100 * r['accuracy']:.2f} %")
    ox = res.get("onnx")
    if ox:
        lines += ["", f"ONNX (T=1): {ox['path']} passed the export parity check; over {ox['images']} test images: "
                  f"max |onnxruntime - eager| {ox['max_abs_err']:.3g}, identical outputs {100 * ox['identical_outputs']:.1f} %, "
                  f"same prediction {100 * ox['same_prediction']:.1f} %"]
    return "\n".join(lines)


def results_tables(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The MODEL_CARD tables of a pipeline's results (``stages``; with the report also ``efficiency``), for
    ``zoo.bench.write_results``."""
    stages = res["stages"]
    ann = stages[0]["test_acc"]
    tables = {"stages": {"columns": ["Stage", "T", "Test top-1 %", "vs ANN", "Epochs", "Wall s"], "rows": [
        [s["stage"], s.get("timesteps") or "-", round(100 * s["test_acc"], 2),
         "" if s["stage"] == "ann" else f"{100 * (s['test_acc'] - ann):+.2f}", s["epochs"], round(s["wall_s"])]
        for s in stages]}}
    eff = res.get("efficiency") or {}
    if eff:
        tables["efficiency"] = {
            "columns": ["Network", "Mean spike rate / neuron / step", "ACs (M)", "MACs (M)", "ANN MACs (M)",
                        "Energy ANN / SNN"],
            "rows": [[name, round(r["mean_spike_rate"], 3), round(r["snn_acs"] / 1e6, 3), round(r["snn_macs"] / 1e6, 3),
                      round(r["ann_macs"] / 1e6, 3), f"{r['energy_ratio']:.2f}x"] for name, r in eff.items()]}
    return tables


def write_results_file(path: str | Path, res: dict[str, Any], out: Path, command: str,
                       load: dict | None = None, notes: str = "") -> Path:
    """``res`` as a results file (``zoo.bench.write_results``: command, date, machine, versions, load)."""
    from zoo.bench import write_results

    dc = res.get("dynamic_confidence")
    data = {"per_layer_spike_rates": {n: [round(l["spike_rate"], 4) for l in r["layers"]]
                                      for n, r in (res.get("efficiency") or {}).items()},
            "dynamic_confidence": dc, "onnx": res.get("onnx"),
            "stages": [{k: v for k, v in s.items() if k not in ("thresholds", "leaks")} for s in res["stages"]]}
    return write_results(path, results_tables(res), command=command,
                         settings={"out": str(out), "torch_threads": torch.get_num_threads()}, load=load, data=data,
                         notes="test split of the embedded digits (359 images), best-validation weights of each stage; "
                               "stage wall times as each stage measured them" + (f"; {notes}" if notes else ""))


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="zoo snn", description="IIR-SNN tools (arXiv 2110.05929).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pipeline", help="ANN -> conversion -> SNN T=5 -> 3 -> 1 on a recipe pair; prints the table",
                       description="Runs every stage as a Lightning fit of its recipe; finished stages are reused, an "
                                   "interrupted one resumes from its last.ckpt. Arguments after -- go to every stage's "
                                   "Lightning CLI (e.g. -- --trainer.accelerator=gpu).")
    p.add_argument("--ann", default=DEFAULT_ANN_RECIPE, help="ANN stage recipe (default %(default)s)")
    p.add_argument("--snn", default=DEFAULT_SNN_RECIPE, help="SNN stage recipe (default %(default)s)")
    p.add_argument("--schedule", default="5,3,1", help="timesteps of the SNN stages, decreasing (default %(default)s)")
    p.add_argument("--out", default="runs/iir_snn_digits", help="output folder (default %(default)s)")
    p.add_argument("--ann-epochs", type=int, default=None, help="override the ANN recipe's max_epochs")
    p.add_argument("--snn-epochs", default=None, help="override the SNN max_epochs: one value or one per stage")
    p.add_argument("--no-report", action="store_true", help="skip spike rates, energy, Dynamic Confidence and ONNX")
    p.add_argument("--results", default=None, help="also write the tables to this results file (zoo.bench."
                   "write_results; MODEL_CARD's is benchmarks/results/snn_digits.json)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    r = sub.add_parser("report", help="spike rates, energy estimate and Dynamic Confidence of a finished pipeline")
    r.add_argument("--out", default="runs/iir_snn_digits")
    r.add_argument("--snn", default=DEFAULT_SNN_RECIPE)
    r.add_argument("--schedule", default="5,3,1")
    r.add_argument("--results", default=None, help="also write the tables to this results file")
    args = ap.parse_args(argv)
    command = "zoo snn " + shlex.join(argv)
    schedule = [int(v) for v in args.schedule.split(",") if v.strip()]
    if args.cmd == "pipeline":
        rest = [a for a in args.rest if a != "--"]
        snn_epochs = None
        if args.snn_epochs:
            vals = [int(v) for v in args.snn_epochs.split(",")]
            snn_epochs = vals[0] if len(vals) == 1 else vals
        from zoo.bench import LoadSampler

        start = time.perf_counter()
        with LoadSampler() as load:
            res = run_pipeline(args.ann, args.snn, schedule, args.out, args.ann_epochs, snn_epochs, rest,
                               report=not args.no_report)
        print(format_report(res))
        if args.results:
            print(f"wrote {write_results_file(args.results, res, Path(args.out), command, load.summary())}")
        print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; results in {args.out}/report.json")
        return 0
    out = Path(args.out)
    names = ["ann", *[f"snn_t{t}" for t in schedule]]
    missing = [f"{n}/metrics.json" for n in names if not (out / n / "metrics.json").is_file()]
    if missing:
        what = f"{out} does not exist" if not out.exists() else f"{out} lacks {', '.join(missing)}"
        print(f"zoo snn report: error: {what}: no finished pipeline with stages {','.join(names)} there. Run "
              f"`zoo snn pipeline --out {out}` first, or pass --out / --schedule of a finished one.", file=sys.stderr)
        return 2
    stages = [json.loads((out / n / "metrics.json").read_text()) for n in names]
    res = {"stages": stages, **_report(out, args.snn, schedule, (0.5, 0.7, 0.8, 0.9, 0.95, 0.99), onnx=schedule[-1] == 1)}
    print(format_report(res))
    if args.results:  # the stages' wall times are those of the pipeline run; the load at that time is not known here
        dates = sorted(time.strftime("%Y-%m-%d %H:%M", time.gmtime((out / n / "metrics.json").stat().st_mtime))
                       for n in names)
        note = (f"stages trained by `zoo snn pipeline --out {out}` (finished {dates[0]} to {dates[-1]} UTC); the load "
                "during that run is not recorded here, the load average is the report's")
        print(f"wrote {write_results_file(args.results, res, out, command, notes=note)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
