"""IIR-SNN pipeline: the Lightning stage module, the T schedule (stages chain, resume) and the zoo snn command."""
import json

import pytest
import torch

pytest.importorskip("lightning")

from zoo.checkpoints import load_file, save_file  # noqa: E402
from zoo.snn.pipeline import (  # noqa: E402
    DEFAULT_SNN_RECIPE, IIRClassification, _load_stage_model, main, run_pipeline, run_stage,
)

TINY_ARGS = dict(cfg=[8, "A", 16, "A"], fc_dims=[32], img_size=8, in_chans=1)
FAST = [
    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--model.init_args.convert_sim_timesteps=3",
    "--model.init_args.convert_batch_size=32",
]


def test_leaks_clamped_after_each_optimizer_step(tmp_path):
    import lightning as L

    from zoo.data import DigitsDataModule

    torch.manual_seed(0)
    module = IIRClassification(model_args=TINY_ARGS, timesteps=2, lr=1e-3)
    assert module.model.timesteps == 2
    with torch.no_grad():
        for _, m in module.model.lif_layers():
            m.leak.fill_(1.3)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(image_size=8, batch_size=16, in_chans=1))
    assert all(v <= 1.0 for v in module.model.leaks().values())


def test_init_from_snn_checkpoint_and_bad_timesteps(tmp_path):
    torch.manual_seed(0)
    src = IIRClassification(model_args=TINY_ARGS, timesteps=3)
    with torch.no_grad():
        src.model.features[0].lif.threshold.fill_(0.37)
    save_file(src.model.state_dict(), tmp_path / "t3.safetensors")
    dst = IIRClassification(model_args=TINY_ARGS, timesteps=1, init_from=str(tmp_path / "t3.safetensors"))
    assert dst.model.timesteps == 1
    for k, v in src.model.state_dict().items():
        assert torch.equal(dst.model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="spiking: false"):
        IIRClassification(model_args={**TINY_ARGS, "spiking": False}, timesteps=3)


def test_schedule_chains_stages_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "iir"
    res = run_pipeline(schedule=(2, 1), out_dir=out, ann_epochs=1, snn_epochs=1, cli_args=FAST, report=False)
    stages = {s["stage"]: s for s in res["stages"]}
    assert list(stages) == ["ann", "snn_t2", "snn_t1"]
    assert [stages[s]["timesteps"] for s in stages] == [None, 2, 1]
    assert stages["snn_t2"]["init_from"] == str(out / "ann" / "model.safetensors")
    assert stages["snn_t1"]["init_from"] == str(out / "snn_t2" / "model.safetensors")
    assert all(0.0 <= s["test_acc"] <= 1.0 for s in stages.values())

    # T=2 started from the converted ANN: percentile thresholds, not the recipe's default 1.0
    t2 = load_file(out / "snn_t2" / "model.safetensors")
    ths = [v.item() for k, v in t2.items() if k.endswith(".threshold")]
    assert len(ths) == 5 and all(abs(v - 1.0) > 1e-3 for v in ths)
    ann = load_file(out / "ann" / "model.safetensors")
    assert "features.0.norm.running_var" in ann and "features.0.lif.threshold" not in ann
    # T=1 started from T=2 (two Adam steps at lr 1e-3 move each value by at most ~2e-3)
    t1 = load_file(out / "snn_t1" / "model.safetensors")
    for k, v in t2.items():
        assert torch.allclose(t1[k], v, atol=5e-3), k

    # a rerun reuses every finished stage
    again = run_pipeline(schedule=(2, 1), out_dir=out, ann_epochs=1, snn_epochs=1, cli_args=FAST, report=False)
    assert all(s.get("reused") for s in again["stages"])

    # an interrupted stage resumes from its last.ckpt: one more epoch on top of the two steps already taken
    (out / "snn_t1" / "model.safetensors").unlink()
    (out / "snn_t1" / "metrics.json").unlink()
    m = run_stage("snn_t1", DEFAULT_SNN_RECIPE, out, init_from=out / "snn_t2" / "model.safetensors", timesteps=1,
                  max_epochs=2, cli_args=FAST)
    assert m["global_step"] == 4 and m["epochs"] == 2
    assert json.loads((out / "snn_t1" / "metrics.json").read_text())["global_step"] == 4

    # the report command: table, spike rates / energy, Dynamic Confidence on T=2, ONNX of T=1
    assert main(["report", "--out", str(out), "--schedule", "2,1"]) == 0
    text = capsys.readouterr().out
    for needle in ("snn_t1", "energy ratio", "Dynamic Confidence on the T=2 SNN", "passed the export parity check"):
        assert needle in text
    assert (out / "snn_t1.onnx").exists()
    assert _load_stage_model(out, "snn_t1").timesteps == 1 and _load_stage_model(out, "snn_t2").timesteps == 2


def test_cli_validates_the_schedule(tmp_path):
    with pytest.raises(ValueError, match="decreasing"):
        main(["pipeline", "--schedule", "1,3", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="snn_epochs"):
        run_pipeline(schedule=(5, 3, 1), snn_epochs=[1, 2], out_dir=tmp_path)
