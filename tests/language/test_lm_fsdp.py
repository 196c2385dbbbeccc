"""The FSDP recipe of the larger LMs (recipes/lfm2/fsdp_1_2b.yaml: LFM2-1.2B / 2.6B) run as written -- FSDP2 through
Lightning's ModelParallelStrategy -- on 2 CPU processes (gloo) with a reduced model and tiny local text: the model is
sharded per decoder layer, trains, and the full weights are gathered from the shards into a self-contained HF
folder that loads and generates."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("{hidden_size: 64, layer_types: [conv, full_attention, conv], num_attention_heads: 4, "
         "num_key_value_heads: 2, intermediate_size: 128, block_auto_adjust_ff_dim: false, "
         "max_position_embeddings: 64}")


def test_fsdp_recipe_on_two_cpu_processes(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(6):
        (text / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 40)
    args = [
        sys.executable, "-m", "zoo.cli", "fit", "-c", str(ROOT / "recipes/lfm2/fsdp_1_2b.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy.init_args.data_parallel_size=2",
        "--trainer.strategy.init_args.process_group_backend=gloo", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--model.init_args.model_args={SMALL}", "--model.init_args.fsdp_param_dtype=null",
        "--model.init_args.warmup_steps=1", "--model.init_args.lr=1e-3",
        f"--data.init_args.files=[{text}/*.txt]", "--data.init_args.tokenizer=byte", "--data.init_args.seq_len=32",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_tokens=256",
        "--data.init_args.val_fraction=0.2", "--data.init_args.test_fraction=0.2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "FSDP: 3 decoder layers + root sharded over 2 data-parallel ranks" in log
    hf = next(tmp_path.rglob("hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf.iterdir()}
    from zoo.language.lfm2 import load_pretrained

    model = load_pretrained(hf)  # the gathered full weights: every tensor complete, nothing sharded
    assert model.config.hidden_size == 64 and model.model.layers[1].self_attn.q_proj.weight.shape == (64, 64)
    assert model.tokenizer.get_vocab_size() == 259
    out = model.generate(torch.tensor([[3 + ord("d"), 3 + ord("e")]]), max_new_tokens=4)
    assert out.shape == (1, 6)
