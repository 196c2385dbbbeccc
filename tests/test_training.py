"""The Lightning CLI: exact mid-epoch resume after a real crash, DDP on CPU, errors before training, config reruns."""
import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zoo.recipes import resolve_recipe
from zoo.training import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]


def _small_recipe(tmp_path: Path, name="r", epochs=2, every_n_steps=4, deploy=False) -> Path:
    """The quickstart recipe, shortened, writing into tmp_path."""
    cfg = yaml.safe_load(resolve_recipe("quickstart").read_text())
    cfg = copy.deepcopy(cfg)
    out = tmp_path / name
    cfg["trainer"].update(max_epochs=epochs, default_root_dir=str(out), log_every_n_steps=1)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out)
    cbs = []
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(out / "checkpoints")
            if "every_n_train_steps" in cb["init_args"]:
                cb["init_args"]["every_n_train_steps"] = every_n_steps
        if cb["class_path"].endswith("DeployExport") and not deploy:
            continue
        cbs.append(cb)
    cfg["trainer"]["callbacks"] = cbs
    cfg["model"]["init_args"]["model_args"]["drop_path_rate"] = 0.1  # exercise the RNG restore too
    cfg["model"]["init_args"]["warmup_epochs"] = 0
    cfg["data"]["init_args"].update(batch_size=128)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _zoo(*args, cwd, check=True, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.run([sys.executable, "-m", "zoo.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"zoo {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _final_val(log_root: Path) -> dict:
    rows = []
    for f in sorted(log_root.rglob("metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    vals = [r for r in rows if r.get("val/acc")]
    return {k: float(v) for k, v in vals[-1].items() if k.startswith("val/") and v}


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path):
    ref = _small_recipe(tmp_path, "ref")
    crash = _small_recipe(tmp_path, "crash")
    _zoo("fit", "-c", str(ref), cwd=tmp_path)
    # 10 steps per epoch (1259 images / 128): die at step 15, mid-epoch 1, after the step-12 checkpoint.
    p = _zoo("fit", "-c", str(crash), "--trainer.callbacks+=tests.helpers.callbacks.KillAtStep",
             "--trainer.callbacks.step=15", cwd=tmp_path, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    last = tmp_path / "crash" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 12
    assert not list((tmp_path / "crash" / "checkpoints").glob("*.part"))
    _zoo("fit", "-c", str(crash), "--ckpt_path", "last", cwd=tmp_path)
    a, b = _final_val(tmp_path / "ref"), _final_val(tmp_path / "crash")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-5), (k, a, b)
    wa = torch.load(tmp_path / "ref/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "crash/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5


def test_ddp_on_two_cpu_processes(tmp_path):
    recipe = _small_recipe(tmp_path, "ddp", epochs=1)
    _zoo("fit", "-c", str(recipe), "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
         cwd=tmp_path)
    ck = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)
    assert ck["epoch"] == 0 and ck["global_step"] == 5  # 1259 images / (2 ranks x 128) = 5 updates


def _cli_error(args, capsys) -> str:
    with pytest.raises((SystemExit, Exception)) as e:
        run_lightning_cli(args)
    err = capsys.readouterr()
    return f"{e.value}\n{err.out}\n{err.err}"


def test_errors_stop_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _cli_error(["fit", "-c", "quickstart", "--model.init_args.learning_rate=0.1"], capsys)
    assert "learning_rate" in msg
    msg = _cli_error(["fit", "-c", "quickstart", "--model.init_args.model_name=nextvit_smal"], capsys)
    assert "nextvit_small" in msg and "nextvit_smal" in msg
    msg = _cli_error(["fit", "-c", "nextvit/imagenet1k", "--data.init_args.root=/nonexistent/imagenet",
                      "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"], capsys)
    assert "/nonexistent/imagenet/train" in msg
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_print_config_and_rerun_into_the_same_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "-c", "quickstart", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "zoo.tasks.ImageClassification"
    recipe = _small_recipe(tmp_path, "rerun", epochs=1)
    args = ["fit", "-c", str(recipe), "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
            "--trainer.logger.init_args.version=fixed"]
    for _ in range(2):  # the second run writes config.yaml into the same folder again
        run_lightning_cli(args)
    assert (tmp_path / "rerun" / "logs" / "fixed" / "config.yaml").exists()


def test_deploy_export_callback_writes_weights_and_onnx(tmp_path):
    from zoo.checkpoints import load_file

    recipe = _small_recipe(tmp_path, "dep", epochs=1, deploy=True)
    cli = run_lightning_cli(["fit", "-c", str(recipe), "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    out = tmp_path / "dep" / "checkpoints"
    sd = load_file(out / "deploy.safetensors")
    assert not any("norm1" in k or ".mlp." in k and "norm" in k for k in sd)
    assert (out / "model.onnx").stat().st_size > 100_000
    import zoo

    m = zoo.create_model("nextvit_small", deploy=True, num_classes=10, checkpoint_path=out / "deploy.safetensors",
                         **cli.model.hparams.model_args)
    x = torch.randn(2, 3, 32, 32)
    cli.model.model.eval()
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), cli.model.model(x), atol=1e-4)
