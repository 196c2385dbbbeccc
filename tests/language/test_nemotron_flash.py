"""Nemotron-Flash: released shapes counted on meta, layer-pattern parsing, meta tokens (prefill only, left padding),
logit normalisation, cached decoding, the transformers integration (Auto classes, generate with the cache,
save/from_pretrained), the release-layout converter on synthetic files, weight normalisation in a short CausalLM run
and `zoo generate` on its export, and clear errors on bad input."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo.language.hybrid import ContextLengthError, HybridCache  # noqa: F401
from zoo.language.nemotron_flash import (
    NemotronFlashLM, checkpoint_filter_fn, hybrid_config_from_nemotron_flash, load_pretrained, parse_layer_pattern,
    to_transformers, weight_normalize_,
)
from zoo.layers.recurrent_mixers import mamba2_dims

TINY = dict(vocab_size=64, hidden_size=32, layer_types="deltanet f m2 f a f m2 f", num_attention_heads=4,
            num_key_value_heads=2, ffn_size=48, mamba_d_state=8, mamba2_headdim=8, mamba_chunk_size=8,
            deltanet_chunk_size=8, num_memory_tokens=3, max_position_embeddings=40)


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = NemotronFlashLM(**TINY).eval()
    with torch.no_grad():  # non-trivial norms and head row norms, so normalisation bugs cannot hide
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
        m.lm_head.weight.mul_(torch.rand(64, 1) * 3 + 0.2)
    return m


def _left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


ROWS = [[5, 9, 17, 33, 2, 41, 8, 13, 21, 3], [7, 30, 11, 6, 50]]


# ---------------------------------------------------------------------------------------------- shapes


def test_released_shapes_on_meta():
    with torch.device("meta"):
        m3 = zoo.create_model("nemotron_flash_3b")
        m1 = zoo.create_model("nemotron_flash_1b")
    assert sum(p.numel() for p in m3.parameters()) == 2_749_605_408
    # 1B: hidden 2048 and the 131072-entry vocabulary are published, the rest assumed (MODEL_CARD.md)
    assert sum(p.numel() for p in m1.parameters()) == 1_227_213_824
    assert m1.config.hidden_size == 2048 and m1.config.vocab_size == 131072 and m1.default_cfg.num_classes == 131072
    types = m3.config.layer_types
    assert len(types) == 36 and types.count("ffn") == 18
    assert [i for i, t in enumerate(types) if t == "deltanet"] == [0, 8, 16, 24, 28, 32]
    assert [i for i, t in enumerate(types) if t == "nf_attention"] == [4, 12, 20]
    assert [i for i, t in enumerate(types) if t == "mamba2"] == list(range(2, 36, 4))
    mamba = m3.model.layers[2].mamba
    # the checkpoint shapes vLLM reports: in_proj 12640, conv1d 6400, norm / out_proj 6144, 96 heads x 64
    assert tuple(mamba.in_proj.weight.shape) == (12640, 3072) and tuple(mamba.conv1d.weight.shape) == (6400, 1, 4)
    assert tuple(mamba.out_proj.weight.shape) == (3072, 6144) and mamba.A_log.shape == (96,)
    assert tuple(m3.model.layers[1].ffn.w1.weight.shape) == (9216, 3072)
    assert m3.lm_head is not None and tuple(m3.model.memory_tokens.shape) == (128, 3072)
    assert m3.model.layers[0].feed_forward is None  # mixer layers carry no FFN


def test_layer_pattern_and_bad_config_values():
    assert parse_layer_pattern("deltanet f | m2 f a") == ("deltanet", "ffn", "mamba2", "ffn", "nf_attention")
    with pytest.raises(ValueError, match=r"unknown operator 'gdn' at position 2"):
        NemotronFlashLM(**{**TINY, "layer_types": "deltanet f gdn f"})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        hybrid_config_from_nemotron_flash({**TINY, "num_key_value_heads": 3})


# ---------------------------------------------------------------------------------------------- behaviour


def test_cached_decode_meta_tokens_and_logit_norm(model):
    ids = torch.randint(1, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :9], cache=cache)]
        assert cache.seen == 9 + 3  # meta tokens enter the cache once, at prefill
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(9, 13)]
        assert cache.seen == 13 + 3
        close(torch.cat(parts, 1), full)
        h = model.forward_features(ids)
        assert h.shape == (2, 13, 32)
        close(full, model.lm_head(h) / model.lm_head.weight.norm(dim=1))
        # the meta tokens matter: zeroing them changes the logits
        saved = model.model.memory_tokens.detach().clone()
        model.model.memory_tokens.zero_()
        assert (model(ids) - full).abs().max() > 1e-3
        model.model.memory_tokens.copy_(saved)


def test_left_padded_batch_equals_rows_alone(model):
    ids, mask = _left_pad(ROWS)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
        for i, r in enumerate(ROWS):
            alone = torch.tensor([r])
            close(logits[i, ids.shape[1] - len(r):], model(alone)[0])
            assert gen[i, -5:].tolist() == model.generate(alone, max_new_tokens=5, eos_token_id=None)[0, -5:].tolist()


def test_prompt_longer_than_context_is_named(model):
    with pytest.raises(ContextLengthError, match=r"38 tokens \+ 3 meta tokens.*max_position_embeddings=40"):
        model.generate(torch.ones(1, 38, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ContextLengthError, match="at most 37"):
        model(torch.ones(1, 39, dtype=torch.long))
    with pytest.raises(ContextLengthError, match="max_new_tokens=9"):
        model.generate(torch.ones(1, 30, dtype=torch.long), max_new_tokens=9)


# ---------------------------------------------------------------------------------------------- transformers


def test_transformers_generate_with_cache_and_roundtrip(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from zoo.language.nemotron_flash import ZooNemotronFlashConfig, ZooNemotronFlashForCausalLM

    hf = to_transformers(model)
    ids, mask = _left_pad(ROWS)
    with torch.no_grad():
        close(hf(ids, attention_mask=mask).logits, model(ids, attention_mask=mask))
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(out.sequences, want)
    cache = out.past_key_values if out.past_key_values is not None else getattr(out, "cache", None)
    assert type(cache).__name__ == "HybridCache" and cache.seen == ids.shape[1] + 3 + 4  # decoded with the cache
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "zoo_nemotron_flash" and cfg["layer_pattern"][:2] == ["deltanet", "f"]
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path / "hf"), ZooNemotronFlashConfig)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back) is ZooNemotronFlashForCausalLM
    with torch.no_grad():
        close(back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask))
    zoo_back = load_pretrained(tmp_path / "hf")  # the transformers save is readable by the pure-PyTorch loader
    with torch.no_grad():
        close(zoo_back(ids), model(ids))


# ---------------------------------------------------------------------------------------------- conversion


def _to_release(sd: dict, layer_types) -> dict:
    """Our keys -> the release's (what nvidia/Nemotron-Flash-* safetensors hold)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("model.embedding_norm.", "model.final_layernorm.")
        if ".layers." in k:
            i = int(k.split(".")[2])
            norm = "pre_ffn_layernorm" if layer_types[i] == "ffn" else "input_layernorm"
            k = (k.replace("operator_norm", norm).replace("ffn.w1", "ffn.gate_proj").replace("ffn.w3", "ffn.up_proj")
                 .replace("ffn.w2", "ffn.down_proj").replace("self_attn.out_proj", "self_attn.o_proj"))
        out[k] = v.to(torch.bfloat16)
    return out


def test_release_layout_checkpoint_converts(model, tmp_path):
    from safetensors.torch import save_file

    release = _to_release(model.state_dict(), model.config.layer_types)
    assert "model.layers.0.gla.q_conv1d.weight" in release and "model.layers.1.ffn.gate_proj.weight" in release
    assert "model.layers.4.self_attn.o_proj.weight" in release and "model.final_layernorm.weight" in release
    keys = sorted(release)
    half = len(keys) // 2  # two shards, as the 3B release
    save_file({k: release[k] for k in keys[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: release[k] for k in keys[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    cfg = {"model_type": "nemotron_flash", "architectures": ["NemotronFlashForCausalLM"], **TINY,
           "layer_types": TINY["layer_types"].split(), "intermediate_size": 0, "hybrid_decoder_layer": "mamba"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_pretrained(tmp_path)
    ids = torch.randint(1, 64, (1, 11))
    with torch.no_grad():
        ref = NemotronFlashLM(**TINY).eval()
        ref.load_state_dict({k: v.float() for k, v in checkpoint_filter_fn(release, ref).items()})
        close(m(ids), ref(ids))
        close(m(ids), model(ids), 0.1)  # bf16 checkpoint vs the fp32 original
    # with the release's model.safetensors.index.json, exactly the shards it lists are read (a stray file is not)
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: shards[i >= half] for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"stray.weight": torch.ones(1)}, str(tmp_path / "consolidated.safetensors"))
    with torch.no_grad():
        close(load_pretrained(tmp_path)(ids), ref(ids))
    (tmp_path / shards[1]).rename(tmp_path / "moved.safetensors")
    with pytest.raises(zoo.checkpoints.CheckpointError, match=f"shard {shards[1]} listed in .*is missing"):
        load_pretrained(tmp_path)
    (tmp_path / "moved.safetensors").rename(tmp_path / shards[1])
    # a checkpoint whose Mamba2 shapes contradict the config is refused, naming the tensor and the config values
    cfg["mamba_d_state"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model.layers.2.mamba.conv1d.weight has shape \(80, 1, 4\).*mamba_d_state=16"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- training


def test_weight_norm_training_export_and_zoo_generate(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    import lightning as L

    from zoo.cli import main
    from zoo.data.text import TextDataModule
    from zoo.tasks.causal_lm import CausalLM

    m = weight_normalize_(NemotronFlashLM(**TINY))
    w = m.model.layers[0].gla.q_proj.weight
    close(w.norm(dim=1), torch.ones(32))
    close(m.model.layers[1].ffn.w2.weight.norm(dim=0), torch.ones(48))
    close(m.lm_head.weight.norm(dim=1), torch.ones(64))
    emb = m.model.embed_tokens  # nGPT's rule: the embedding rows too (the padding row stays zero)
    rows = [i for i in range(64) if i != emb.padding_idx]
    close(emb.weight[rows].norm(dim=1), torch.ones(len(rows)))
    assert emb.padding_idx is None or not emb.weight[emb.padding_idx].any()
    # o_proj is square here ([32, 32]): it writes to the residual stream, so its columns are normalised, not rows
    o = m.model.layers[0].gla.o_proj.weight
    close(o.norm(dim=0), torch.ones(32))
    assert not torch.allclose(o.norm(dim=1), torch.ones(32), atol=1e-3)
    close(m.model.layers[4].self_attn.out_proj.weight.norm(dim=0), torch.ones(32))
    close(m.model.layers[2].mamba.out_proj.weight.norm(dim=0), torch.ones(64))

    args = {k: v for k, v in TINY.items() if k != "vocab_size"}
    task = CausalLM("nemotron_flash_1b", model_args=args, lr=1e-2, warmup_steps=1, weight_norm=True,
                    export_dir=str(tmp_path / "hf"))
    docs = tmp_path / "text"
    docs.mkdir()
    for i in range(6):  # a few local files: the stdlib corpus scan is not what is tested here
        (docs / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 40)
    dm = TextDataModule(files=[f"{docs}/*.txt"], seq_len=16, batch_size=4, val_tokens=64, val_fraction=0.2,
                        test_fraction=0.2, num_workers=0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        default_root_dir=str(tmp_path))
    trainer.fit(task, dm)
    close(task.model.model.layers[2].mamba.in_proj.weight.norm(dim=1), torch.ones(mamba2_dims(task.model.config)
                                                                                   ["in_proj"]))
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    with pytest.raises(ValueError, match="normalize_weights_"):
        CausalLM("lfm2_350m", model_args={"hidden_size": 32}, weight_norm=True, vocab_size=64)


def test_head_row_norms_are_kept_between_tokens_and_follow_weight_changes(model):
    """Decoding does not re-read the head for its row norms every token, yet in-place updates, replaced weights and
    training (autograd through the norms) all see the current weight."""
    import copy

    m = copy.deepcopy(model)
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(7))

    def want(h):  # the normalisation written out
        w = m.lm_head.weight
        return h @ w.t() / w.float().norm(dim=1).clamp_min(1e-12)

    h = torch.randn(1, 1, 32)
    with torch.no_grad():
        close(m.forward_head(h), want(h))
        kept = m.lm_head._zoo_row_norms[1]
        m.forward_head(h)
        assert m.lm_head._zoo_row_norms[1] is kept  # the same tensor: not recomputed
        m.lm_head.weight[3].mul_(5)  # in place
        close(m.forward_head(h), want(h))
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight * torch.rand(64, 1))  # replaced
        close(m.forward_head(h), want(h))
    q = copy.deepcopy(m)
    with torch.inference_mode():  # a head converted under inference_mode (no version counter) works the same
        q.lm_head.weight = torch.nn.Parameter(q.lm_head.weight * 2)
        w = q.lm_head.weight
        close(q.forward_head(h), h @ w.t() / w.float().norm(dim=1).clamp_min(1e-12))
    m.train()
    m.zero_grad()
    m(ids).float().logsumexp(-1).mean().backward()
    g = m.lm_head.weight.grad.clone()
    ref = copy.deepcopy(m)
    ref.zero_grad()
    w = ref.lm_head.weight
    (ref.forward_features(ids) @ w.t() / w.float().norm(dim=1)).float().logsumexp(-1).mean().backward()
    close(g, ref.lm_head.weight.grad)
