"""LM data (stdlib corpus, byte / BPE tokenizers, bits per byte), the CausalLM task with distillation, a short
end-to-end fit -> export -> `zoo generate` run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
import lightning as L  # noqa: E402

from zoo.data.text import (  # noqa: E402
    EOS_ID, TextDataModule, byte_tokenizer, split_of, stdlib_files, token_byte_lengths, train_bpe,
)
from zoo.tasks.causal_lm import CausalLM, decoupled_topk_kd_loss  # noqa: E402

TINY_ARGS = dict(hidden_size=64, layer_types=["conv", "full_attention", "conv"], num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, block_auto_adjust_ff_dim=False,
                 max_position_embeddings=64)


def test_stdlib_corpus_split_and_byte_tokenizer():
    root, files = stdlib_files()
    assert len(files) > 100 and not any("test" in f.relative_to(root).parts[:-1] for f in files)
    rel = [str(f.relative_to(root)) for f in files]
    splits = [split_of(r, 0.03, 0.03) for r in rel]
    assert splits == [split_of(r, 0.03, 0.03) for r in rel]  # stable
    assert {"train", "val", "test"} <= set(splits)
    tok = byte_tokenizer()
    text = "def f(x):\n    return 'héllo' + x  # ünïcode\n"
    ids = tok.encode(text).ids
    assert ids == (np.frombuffer(text.encode(), np.uint8).astype(int) + 3).tolist()
    assert tok.decode(ids) == text and tok.get_vocab_size() == 259
    tb = token_byte_lengths(tok)
    assert tb[EOS_ID] == 1 and tb[0] == 0 and (tb[3:] == 1).all()


def test_bpe_tokenizer_and_byte_normalisation():
    texts = [f.read_text() for f in stdlib_files()[1][:40]]
    tok = train_bpe(texts, 400)
    assert tok.get_vocab_size() == 400
    tb = token_byte_lengths(tok)
    sample = texts[0][:2000]
    ids = tok.encode(sample).ids
    assert tok.decode(ids) == sample
    assert tb[ids].sum() == len(sample.encode())  # byte counts add up exactly: bits/byte is well defined


def test_datamodule_windows_and_unigram_baseline():
    dm = TextDataModule(seq_len=32, batch_size=4, max_bytes=200_000, val_tokens=4096)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert dm.vocab_size == 259 and dm.special_token_ids == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    val = list(dm.val_dataloader())
    assert sum(b[0].shape[0] for b in val) == 4096 // 32
    # the unigram baseline is a real cross-entropy: between 3 and 8 bits for code bytes
    assert 3.0 < dm.unigram_bpb < 8.0
    counts = np.bincount(dm.streams["train"], minlength=259) + 1.0
    p = counts / counts.sum()
    ys = np.concatenate([b[1].numpy().ravel() for b in val])
    assert math.isclose(dm.unigram_bpb, -np.log2(p[ys]).sum() / len(ys), rel_tol=1e-9)


def test_decoupled_topk_loss():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 50, generator=g) * 3
    assert decoupled_topk_kd_loss(t, t, k=8).abs().item() < 1e-5
    s = torch.randn(3, 5, 50, generator=g, requires_grad=True)
    loss = decoupled_topk_kd_loss(s, t, k=8, temperature=2.0)
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().sum() > 0
    # only the top-K mass and the within-top-K shape matter: reshuffling the student's tail changes nothing
    idx = t.topk(8, -1).indices
    tail = torch.ones_like(t, dtype=torch.bool).scatter(-1, idx, False)
    s2 = s.detach().clone()
    vals = s2[tail].reshape(3, 5, 42)
    s2[tail] = vals.flip(-1).reshape(-1)
    assert torch.isclose(decoupled_topk_kd_loss(s2, t, k=8, temperature=2.0), loss.detach(), atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """~40 steps of a tiny hybrid on 200 KB of the stdlib, exported to HF layout."""
    out = tmp_path_factory.mktemp("lm_run")
    torch.manual_seed(0)
    dm = TextDataModule(seq_len=64, batch_size=8, max_bytes=200_000, val_tokens=4096)
    model = CausalLM("lfm2_350m", model_args=TINY_ARGS, lr=5e-3, warmup_steps=5, export_dir=str(out / "hf"))
    trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=40,
                        limit_val_batches=4, default_root_dir=str(out))
    trainer.fit(model, dm)
    return trainer, model, dm, out


def test_short_training_beats_unigram_and_exports(trained):
    trainer, model, dm, out = trained
    bpb = trainer.callback_metrics["val/bpb"].item()
    assert bpb < dm.unigram_bpb  # 40 steps already learn more than byte frequencies
    assert model.hparams.vocab_size == 259 and model.model.config.eos_token_id == EOS_ID
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "tokenizer.json").exists()


def test_zoo_generate_streams_from_export(trained, capsys):
    from zoo.cli import main

    _, _, _, out = trained
    assert main(["generate", str(out / "hf"), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and len(captured.out) > len("def \n")
    assert "decode" in captured.err and "tokens/s" in captured.err
    with pytest.raises(SystemExit, match="neither a folder nor a registered model"):
        main(["generate", "no_such_model_xyz", "--prompt", "x"])


def test_distillation_from_exported_teacher(trained, tmp_path):
    _, _, _, out = trained
    dm = TextDataModule(seq_len=32, batch_size=4, max_bytes=50_000, val_tokens=1024)
    student = CausalLM("lfm2_350m", model_args=TINY_ARGS, distill_teacher=str(out / "hf"), distill_topk=8,
                       distill_alpha=0.5, export_dir="")
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(student, dm)
    assert "train/kd" in trainer.callback_metrics and trainer.callback_metrics["train/kd"].item() > 0
    assert not any(k.startswith("teacher") for k in student.state_dict())  # the teacher is never saved


def test_time_budget_schedule_warms_up_then_decays_to_min_lr():
    task = CausalLM("lfm2_350m", model_args=TINY_ARGS, vocab_size=259, lr=1e-3, min_lr=1e-5, warmup_steps=10,
                    sched_by_time=True)

    class FakeTimer:
        elapsed = 0.0

        def time_elapsed(self, stage):
            return self.elapsed

        def time_remaining(self, stage):
            return 100.0 - self.elapsed

    class FakeTrainer:
        global_step = 0

    timer, trainer = FakeTimer(), FakeTrainer()
    task._trainer = trainer  # global_step reads trainer.global_step
    f = []
    for step, t in [(0, 0.0), (9, 1.0), (50, 25.0), (200, 50.0), (400, 99.0), (500, 100.0)]:
        trainer.global_step, timer.elapsed = step, t
        f.append(task._time_factor(timer))
    assert f[0] == pytest.approx(0.1) and f[1] == pytest.approx(1.0, abs=1e-3)
    assert f[1] > f[2] > f[3] > f[4] > f[5] and f[5] == pytest.approx(1e-2)  # min_lr / lr at the end of the budget


def test_generate_cli_offline_name_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    from zoo.cli import main

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="could not fetch LiquidAI/LFM2-350M"):
        main(["generate", "lfm2_350m", "--prompt", "x", "--cache-dir", str(tmp_path)])


def test_saved_lm_folder_is_self_contained(trained, tmp_path):
    """The export holds its tokenizer for transformers too: pipeline("text-generation", model=DIR) works on it, and a
    model loaded from it re-saves a complete folder (issue 11: LM folders saved with their tokenizer)."""
    transformers = pytest.importorskip("transformers")
    from zoo.cli import main
    from zoo.language.lfm2 import load_pretrained

    _, _, _, out = trained
    pipe = transformers.pipeline("text-generation", model=str(out / "hf"), device="cpu")
    assert type(pipe.model).__name__ == "Lfm2ForCausalLM"  # config.json says lfm2: transformers' own class
    text = pipe("def ", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("def ") and len(text) > 4
    m = load_pretrained(out / "hf")
    m.save_pretrained(tmp_path / "again")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "again").iterdir()}
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").eos_token == "<|endoftext|>"
    assert main(["generate", str(tmp_path / "again"), "--prompt", "def ", "--max-new-tokens", "3"]) == 0
