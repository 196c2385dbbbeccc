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


def _small_recipe(tmp_path: Path, name="r", epochs=2, every_n_steps=4, deploy=False, onnx=True) -> Path:
    """The quickstart recipe, shortened, with its runs under tmp_path/name/version_N."""
    cfg = yaml.safe_load(resolve_recipe("quickstart").read_text())
    cfg = copy.deepcopy(cfg)
    out = tmp_path / name
    cfg["trainer"].update(max_epochs=epochs, default_root_dir=str(out), log_every_n_steps=1)
    cbs = []
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint") and "every_n_train_steps" in cb["init_args"]:
            cb["init_args"]["every_n_train_steps"] = every_n_steps
        if cb["class_path"].endswith("DeployExport"):
            if not deploy:
                continue
            cb["init_args"]["onnx"] = onnx
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


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = _small_recipe(tmp_path, "ref")
    crash = _small_recipe(tmp_path, "crash")
    # Only the crash needs a process of its own (SIGKILL); the reference run and the resume run in this process,
    # which saves two interpreter start-ups (~5 s of imports each) and still compares a fresh resume to a clean run.
    run_lightning_cli(["fit", "-c", str(ref)])
    # 10 steps per epoch (1259 images / 128): die at step 15, mid-epoch 1, after the step-12 checkpoint.
    p = _zoo("fit", "-c", str(crash), "--trainer.callbacks+=tests.helpers.callbacks.KillAtStep",
             "--trainer.callbacks.step=15", cwd=tmp_path, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    last = tmp_path / "crash" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 12
    assert not list((tmp_path / "crash" / "version_0" / "checkpoints").glob("*.part"))
    # `--ckpt_path last` finds the crashed run's last.ckpt; the resumed run writes into its own version_1
    run_lightning_cli(["fit", "-c", str(crash), "--ckpt_path", "last"])
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 12  # left as it was
    a, b = _final_val(tmp_path / "ref"), _final_val(tmp_path / "crash")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-5), (k, a, b)
    wa = torch.load(tmp_path / "ref/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "crash/version_1/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5


def test_ddp_on_two_cpu_processes(tmp_path):
    recipe = _small_recipe(tmp_path, "ddp", epochs=1)
    _zoo("fit", "-c", str(recipe), "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
         cwd=tmp_path)
    ck = torch.load(tmp_path / "ddp/version_0/checkpoints/last.ckpt", weights_only=True)
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
    assert (tmp_path / "rerun" / "fixed" / "config.yaml").exists()


def test_deploy_export_callback_writes_weights_and_onnx(tmp_path):
    import onnx

    import zoo
    from zoo.checkpoints import load_file
    from zoo.deploy import load_trained_model
    from zoo.tools import export_main

    recipe = _small_recipe(tmp_path, "dep", epochs=1, deploy=True)
    cli = run_lightning_cli(["fit", "-c", str(recipe), "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                             "--data.init_args.image_size=40"])
    out = tmp_path / "dep" / "version_0" / "checkpoints"
    sd = load_file(out / "deploy.safetensors")
    assert not any("norm1" in k or ".mlp." in k and "norm" in k for k in sd)
    graph = onnx.load(str(out / "model.onnx")).graph  # exported at the size it was trained at
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 40, 40]
    m = zoo.create_model("nextvit_small", deploy=True, num_classes=10, checkpoint_path=out / "deploy.safetensors",
                         **cli.model.hparams.model_args)
    x = torch.randn(2, 3, 40, 40)
    cli.model.model.eval()
    with torch.no_grad():
        ref = cli.model.model(x)
        assert torch.allclose(m.eval()(x), ref, atol=1e-4)
    # Training outputs describe themselves: architecture, head, data config and class names, no --model needed.
    for f in (out / "deploy.safetensors", out / "last.ckpt"):
        loaded = load_trained_model(f)
        assert loaded.pretrained_cfg["input_size"] == (3, 40, 40) and loaded.class_names == [str(i) for i in range(10)]
        with torch.no_grad():
            assert torch.allclose(loaded(x), ref, atol=1e-4)
    # `zoo export` of a training output exports at the size it was trained at. One ONNX export here (~6 s of CPU
    # each); tests/test_readme_commands.py checks the same for the deploy.safetensors the README exports.
    onnx_path = tmp_path / "last.onnx"
    assert export_main([str(out / "last.ckpt"), "-o", str(onnx_path)]) == 0
    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 40, 40]
    # the preprocessing timm derives from the loaded model is the one it was trained with
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=loaded)
    assert dc["input_size"] == (3, 40, 40)
    assert dc["mean"] == pytest.approx(cli.datamodule.data_config["mean"])


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_runs_keep_their_own_folders_and_sanity_runs_write_nothing(tmp_path, monkeypatch):
    """Reruns get version_N folders and never touch earlier ones; fast_dev_run leaves nothing; default_root_dir
    moves everything; --ckpt_path best / last find the earlier runs; predictions land in the new run's folder."""
    import json

    monkeypatch.chdir(tmp_path)
    recipe = _small_recipe(tmp_path, "runs", epochs=1, deploy=True, onnx=False)  # ONNX placement: the test above
    quick = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    run_lightning_cli(["fit", "-c", str(recipe), *quick])
    first = _files(tmp_path / "runs")
    assert {"version_0/checkpoints/last.ckpt", "version_0/checkpoints/deploy.safetensors",
            "version_0/config.yaml"} <= set(first)
    assert any(k.startswith("version_0/checkpoints/best-") for k in first)

    cli = run_lightning_cli(["fit", "-c", str(recipe), *quick])  # a rerun: new folder, the first untouched
    assert cli.trainer.log_dir.endswith("version_1")
    after = _files(tmp_path / "runs")
    assert {k: v for k, v in after.items() if k.startswith("version_0/")} == first
    assert "version_1/checkpoints/last.ckpt" in after

    before = _files(tmp_path)
    run_lightning_cli(["fit", "-c", str(recipe), "--trainer.fast_dev_run=true"])  # a sanity run: writes nothing
    assert _files(tmp_path) == before

    run_lightning_cli(["fit", "-c", str(recipe), *quick, "--trainer.default_root_dir=elsewhere"])
    moved = _files(tmp_path / "elsewhere")
    assert {"version_0/checkpoints/last.ckpt", "version_0/checkpoints/deploy.safetensors",
            "version_0/metrics.csv"} <= set(moved)
    assert _files(tmp_path / "runs") == after

    # best / last resolve to the newest earlier run under the recipe's root (version_1 here)
    cli = run_lightning_cli(["test", "-c", str(recipe), "--ckpt_path", "best", "--trainer.limit_test_batches=1"])
    assert Path(cli.trainer.ckpt_path).parent == tmp_path / "runs/version_1/checkpoints"
    assert Path(cli.trainer.ckpt_path).name.startswith("best-")
    from zoo.data import DigitsDataModule

    DigitsDataModule().save_images(tmp_path / "imgs", n=3)
    cli = run_lightning_cli(["predict", "-c", str(recipe), "--ckpt_path", "last",
                             f"--data.init_args.predict_path={tmp_path / 'imgs'}"])
    assert cli.trainer.ckpt_path == str(tmp_path / "runs/version_1/checkpoints/last.ckpt")
    pred_dir = Path(cli.trainer.log_dir)
    rows = json.loads((pred_dir / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in rows] == sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert all(len(r["labels"]) == 3 and r["labels"][0] in "0123456789" for r in rows)
    header = (pred_dir / "predictions.csv").read_text().splitlines()[0]
    assert header == "file,label_1,score_1,label_2,score_2,label_3,score_3"
    assert _files(tmp_path / "runs").keys() >= after.keys()


def test_ckpt_path_best_without_an_earlier_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no best checkpoint of an earlier run"):
        run_lightning_cli(["test", "-c", "quickstart", "--ckpt_path", "best"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cli_errors_are_short(tmp_path, capsys, monkeypatch):
    import warnings

    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", "quickstrat"]) == 2
    err = capsys.readouterr().err
    assert "did you mean quickstart?" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["fit"]) == 2
    err = capsys.readouterr().err
    assert "zoo fit --help" in err and "zoo recipes" in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            run_lightning_cli(["validate", "-c", "quickstart", "--print_config"])
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_predicting_on_image_files_matches_the_training_preprocessing(tmp_path):
    """Digits saved as PNGs and read back through predict_path give the tensors the model is trained on."""
    from zoo.data import DigitsDataModule

    dm = DigitsDataModule(image_size=32, batch_size=4)
    paths = dm.save_images(tmp_path, n=4)
    dm.predict_path = str(tmp_path)
    x_files, names = next(iter(dm.predict_dataloader()))
    assert sorted(Path(n).name for n in names) == sorted(p.name for p in paths)
    position = {p.name: j for j, p in enumerate(paths)}  # save_images writes the split's first images in order
    x_test = dm._splits["test"].tensors[0][[position[Path(n).name] for n in names]]
    # 8-bit PNG rounding and PIL's resize vs F.interpolate: small differences only (values span about 4 units)
    assert (x_files - x_test).abs().max() < 0.15
