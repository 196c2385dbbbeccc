"""DeltaNet / Mamba2 operators: chunked == recurrent (any length, chunk boundaries included), parity with
transformers' pure-PyTorch references (qwen3_next gated delta rule with the gate off, Mamba2Mixer), and the operators
inside the hybrid decoder: full forward == prefill + cached decode, left padding == rows alone, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.language.hybrid import HybridConfig, HybridLM
from zoo.layers.recurrent_mixers import (
    Mamba2, RecurrentState, delta_rule_chunked, delta_rule_recurrent, ssd_chunked, ssd_recurrent,
)

LENGTHS = [1, 7, 8, 9, 17]  # chunk size 8: below, at and past chunk boundaries


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("t", LENGTHS)
def test_delta_rule_chunked_equals_recurrent(t):
    g = torch.Generator().manual_seed(t)
    b, h, dk, dv = 2, 3, 8, 6
    q = torch.randn(b, h, t, dk, generator=g)
    k = F.normalize(torch.randn(b, h, t, dk, generator=g), dim=-1)
    v = torch.randn(b, h, t, dv, generator=g)
    beta = torch.rand(b, h, t, generator=g)
    s0 = torch.randn(b, h, dk, dv, generator=g)
    o1, s1 = delta_rule_recurrent(q, k, v, beta, s0)
    o2, s2 = delta_rule_chunked(q, k, v, beta, s0, chunk_size=8)
    close(o1, o2)
    close(s1, s2)


@pytest.mark.parametrize("t", LENGTHS)
def test_ssd_chunked_equals_recurrent(t):
    g = torch.Generator().manual_seed(t)
    b, h, p, n, groups = 2, 4, 5, 7, 2
    x = torch.randn(b, t, h, p, generator=g)
    dt = F.softplus(torch.randn(b, t, h, generator=g))
    a = -3 * torch.rand(h, generator=g)
    bm, cm = torch.randn(b, t, groups, n, generator=g), torch.randn(b, t, groups, n, generator=g)
    d, s0 = torch.randn(h, generator=g), torch.randn(b, h, p, n, generator=g)
    y1, s1 = ssd_recurrent(x, dt, a, bm, cm, d, s0)
    y2, s2 = ssd_chunked(x, dt, a, bm, cm, d, s0, chunk_size=8)
    close(y1, y2, 2e-5)
    close(s1, s2, 2e-5)


def test_delta_rule_matches_transformers_gated_delta_rule_without_gate():
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    g = torch.Generator().manual_seed(0)
    b, h, t, dk, dv = 1, 2, 13, 8, 6
    q, k = torch.randn(b, t, h, dk, generator=g), torch.randn(b, t, h, dk, generator=g)
    v, beta = torch.randn(b, t, h, dv, generator=g), torch.rand(b, t, h, generator=g)
    s0 = torch.randn(b, h, dk, dv, generator=g)
    gate = torch.zeros(b, t, h)  # log decay 0: the plain delta rule
    ours, s_ours = delta_rule_chunked(*(F.normalize(z, dim=-1, eps=1e-12).transpose(1, 2) for z in (q, k)),
                                      v.transpose(1, 2), beta.transpose(1, 2), s0, chunk_size=8)
    for fn, kw in ((qn.torch_chunk_gated_delta_rule, {"chunk_size": 8}), (qn.torch_recurrent_gated_delta_rule, {})):
        ref, s_ref = fn(q, k, v, gate, beta, initial_state=s0, output_final_state=True,
                        use_qk_l2norm_in_kernel=True, **kw)
        ref = ref if ref.shape[1] == h else ref.transpose(1, 2)
        close(ours, ref, 1e-4)
        close(s_ours, s_ref, 1e-4)


EXTRA = dict(mamba_d_state=8, mamba_headdim=8, mamba_expand=2, mamba_chunk_size=8, deltanet_chunk_size=8,
             ffn_size=48)


def hybrid(layer_types=("deltanet", "ffn", "mamba2", "ffn", "full_attention", "ffn"), seed=0, **kw) -> HybridLM:
    torch.manual_seed(seed)
    cfg = HybridConfig(vocab_size=64, hidden_size=32, layer_types=layer_types, intermediate_size=0,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, extra={**EXTRA, **kw})
    m = HybridLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return m


def test_mamba2_mixer_matches_transformers_torch_path():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = transformers.Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2, expand=2,
                                    conv_kernel=4, chunk_size=8, use_bias=False, use_conv_bias=True,
                                    layer_norm_epsilon=1e-5, num_hidden_layers=1)
    torch.manual_seed(0)
    ref = Mamba2Mixer(cfg, layer_idx=0).eval()
    m = hybrid(("mamba2",), mamba_ngroups=2)
    ours = m.model.layers[0].mamba
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.A_log.copy_(torch.log(torch.rand(8) * 4 + 0.5))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 32)
    from zoo.language.hybrid import build_context

    with torch.no_grad():
        ctx = build_context(64, x[..., 0].long(), None, None, None)
        close(ours(x, ctx), ref(x), 1e-4)


@pytest.fixture(scope="module")
def model():
    return hybrid()


def test_full_forward_equals_prefill_plus_cached_decode(model):
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        for split in (1, 8, 9):  # chunk size 8: prefill below, at and past a chunk boundary, then decode
            cache = model.new_cache()
            parts = [model(ids[:, :split], cache=cache)]
            for i in range(split, ids.shape[1]):
                parts.append(model(ids[:, i:i + 1], cache=cache))
            close(torch.cat(parts, 1), full, 2e-5)
    states = [s for s in cache.layers if isinstance(s, RecurrentState)]
    assert len(states) == 2 and all(s.conv.shape[1] == 3 for s in states)


def test_left_padded_batch_equals_rows_alone(model):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in (11, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6)
        logits = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], max_new_tokens=6)
            assert torch.equal(batch[i, width:], alone[0, len(r):])
            close(logits[i, width - len(r):], model(r[None])[0], 2e-5)


def test_training_backward_reaches_every_parameter(model):
    m = hybrid(seed=1).train()
    ids = torch.randint(1, 64, (2, 12))
    m(ids).logsumexp(-1).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="'mamba3'"):
        hybrid(("deltanet", "mamba3"))
    with pytest.raises(ValueError, match="packed sequences"):
        model(torch.ones(1, 6, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), cache=cache)
    assert not cache.is_croppable
    with pytest.raises(RuntimeError, match="RecurrentState"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="mamba_headdim=7"):
        hybrid(("mamba2",), mamba_headdim=7)
    assert isinstance(model.model.layers[2].mamba, Mamba2)


def test_fast_step_path_equals_eager_forward_path():
    m = hybrid(mamba_ngroups=2, seed=2)
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    calls = []
    hooks = [mod.register_forward_hook(lambda *a: calls.append(1)) for mod in m.modules() if isinstance(mod, Mamba2)]
    with torch.no_grad():
        fast = m.generate(ids, max_new_tokens=6)
        n_forward = len(calls)  # the prefill only: decoding ran the operators' step
        eager = m.set_decode_path("eager").generate(ids, max_new_tokens=6)
        m.set_decode_path("fast")
    for h in hooks:
        h.remove()
    assert n_forward == 1 and len(calls) == 1 + 6
    assert torch.equal(fast, eager)
