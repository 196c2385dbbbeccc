"""The hybrid LMs as transformers models (checked on LFM2 against transformers' own ``Lfm2ForCausalLM`` on identical
weights): the loss and ``transformers.Trainer`` gradient accumulation, masks of any padding side and packed sequences,
returned hidden states / attentions, ``return_dict``, activation checkpointing, ``generate()`` with the hybrid cache
(a transformers ``Cache``: continuation, assisted and prompt-lookup decoding, static cache, beams, ``inputs_embeds``),
the base model, declared parallel plans and ``torch.export`` with a mask."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from zoo.language.hybrid import causal_lm_loss  # noqa: E402
from zoo.language.lfm2 import ZooLfm2ForCausalLM, ZooLfm2Model  # noqa: E402

LAYERS = ["conv", "full_attention", "conv", "conv", "full_attention"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' Lfm2ForCausalLM, ZooLfm2ForCausalLM loaded from its folder, the folder)."""
    torch.manual_seed(1)
    cfg = transformers.Lfm2Config(
        vocab_size=96, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=192, layer_types=LAYERS, max_position_embeddings=64, eos_token_id=None, pad_token_id=0,
        initializer_range=0.1,  # peaked logits: greedy continuations are not one repeated token
    )
    ref = transformers.Lfm2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a non-zero pad row so masking mistakes show
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
        ref.model.embed_tokens.weight[0].normal_(0, 2.0)
    path = tmp_path_factory.mktemp("hf_lfm2")
    ref.save_pretrained(path)
    return ref, ZooLfm2ForCausalLM.from_pretrained(path).eval(), path


def small(diff: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    """float32 round-off: max |diff| within ``tol`` relative to the reference's largest magnitude (at least 1)."""
    return diff.abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def ids_of(*shape, seed=0):
    return torch.randint(1, 96, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- loss / Trainer


def test_loss_follows_transformers_causal_lm_loss(pair):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 96, generator=g)
    labels = torch.randint(0, 96, (3, 7), generator=g)
    labels[0, :4] = -100
    shifted = torch.randint(0, 96, (3, 7), generator=g)
    for kw in ({}, {"num_items_in_batch": torch.tensor(11)}, {"num_items_in_batch": 5},
               {"shift_labels": shifted}, {"shift_labels": shifted, "num_items_in_batch": torch.tensor(30)}):
        want = ForCausalLMLoss(logits, labels, vocab_size=96, **kw)
        assert torch.equal(causal_lm_loss(logits, labels, **kw), want), kw
    ref, ours, _ = pair
    ids = ids_of(2, 9)
    lab = ids.clone()
    lab[1, :3] = -100
    with torch.no_grad():
        for kw in ({}, {"num_items_in_batch": torch.tensor(40)}):
            a, b = ref(ids, labels=lab, **kw).loss, ours(ids, labels=lab, **kw).loss
            assert abs(a.item() - b.item()) < 1e-6


class _Rows(torch.utils.data.Dataset):
    """8 rows of very different lengths, right- (and one left-) padded, so per-micro-batch averaging is visibly wrong."""

    def __init__(self):
        self.rows = []
        for i, n in enumerate([16, 15, 14, 16, 2, 3, 2, 4]):
            ids = ids_of(16, seed=100 + i)
            mask = torch.zeros(16, dtype=torch.long)
            if i == 5:
                mask[-n:] = 1
            else:
                mask[:n] = 1
            ids = ids.masked_fill(mask == 0, 0)
            labels = ids.masked_fill(mask == 0, -100)
            if i == 5:  # its first real token would be scored from a padding position: models differ there
                labels[-n] = -100
            self.rows.append(dict(input_ids=ids, attention_mask=mask, labels=labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train_once(model, tmp_path, batch, accum, **args):
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        train_sampling_strategy="sequential", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        logging_steps=1, **args,
    )
    out = transformers.Trainer(model=model, args=targs, train_dataset=_Rows()).train()
    upd = {k: v.detach() - before[k] for k, v in model.named_parameters()}
    return upd, out.training_loss


def test_trainer_gradient_accumulation_equals_big_batch_and_transformers(pair, tmp_path):
    _, _, path = pair
    ref_upd, ref_loss = _train_once(transformers.Lfm2ForCausalLM.from_pretrained(path), tmp_path, 4, 2)
    acc_upd, acc_loss = _train_once(ZooLfm2ForCausalLM.from_pretrained(path), tmp_path, 4, 2)
    big_upd, big_loss = _train_once(ZooLfm2ForCausalLM.from_pretrained(path), tmp_path, 8, 1)
    ckpt_upd, _ = _train_once(ZooLfm2ForCausalLM.from_pretrained(path), tmp_path, 4, 2, activation_checkpointing=True)

    def norm(u):
        return torch.sqrt(sum((v.double() ** 2).sum() for v in u.values())).item()

    def maxdiff(a, b):  # relative to the largest update entry
        assert set(a) == set(b)
        return max((a[k] - b[k]).abs().max().item() for k in a) / max(v.abs().max().item() for v in b.values())

    n = norm(big_upd)
    assert n > 0.5  # a real update (SGD, lr 1)
    print(f"update norms: accumulated {norm(acc_upd):.6f}, big batch {n:.6f}, transformers {norm(ref_upd):.6f}; "
          f"max |diff| / max |update|: acc-big {maxdiff(acc_upd, big_upd):.2e}, acc-transformers {maxdiff(acc_upd, ref_upd):.2e}, "
          f"checkpointed-acc {maxdiff(ckpt_upd, acc_upd):.2e}")
    assert abs(norm(acc_upd) - n) < 1e-5 * n and abs(norm(ref_upd) - n) < 1e-5 * n
    assert maxdiff(acc_upd, big_upd) < 1e-6
    assert maxdiff(acc_upd, ref_upd) < 5e-6
    assert maxdiff(ckpt_upd, acc_upd) < 1e-6  # Trainer(gradient_checkpointing=True) works and changes nothing
    assert abs(acc_loss - big_loss) < 1e-5 and abs(acc_loss - ref_loss) < 1e-5


# ---------------------------------------------------------------------------------------------- masks, outputs


def test_any_padding_side_and_packed_sequences(pair):
    ref, ours, _ = pair
    ids = ids_of(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    mask[2, 5] = 0  # a masked token inside the row
    real = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, use_cache=False).logits
        got = ours(ids, attention_mask=mask, use_cache=False).logits
        assert small((got - want)[real], want)
        # packed: two sequences in one row, marked by position_ids restarting at 0
        a, b = ids_of(1, 7, seed=3), ids_of(1, 5, seed=4)
        pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
        packed = ours(torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
        assert small(packed[:, :7] - ours(a, use_cache=False).logits, packed)
        assert small(packed[:, 7:] - ours(b, use_cache=False).logits, packed)
    # with a cache the last token of each row must be real
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):
        ours(ids, attention_mask=mask, use_cache=True)


def test_hidden_states_attentions_and_return_dict(pair):
    ref, ours, _ = pair
    ids = ids_of(2, 9)
    with torch.no_grad():
        a = ref(ids, output_hidden_states=True, use_cache=False)
        b = ours(ids, output_hidden_states=True, use_cache=False)
        assert len(b.hidden_states) == len(a.hidden_states) == 6  # embeddings + one per layer (the last one normed)
        assert all(small(x - y, x) for x, y in zip(a.hidden_states, b.hidden_states))
        ref.set_attn_implementation("eager")  # transformers returns attention probabilities from eager attention only
        try:
            a = ref(ids, output_attentions=True, use_cache=False)
        finally:
            ref.set_attn_implementation("sdpa")
        b = ours(ids, output_attentions=True, use_cache=False)
        assert len(b.attentions) == len(a.attentions) == 2 and b.attentions[0].shape == (2, 4, 9, 9)
        assert max((x - y).abs().max().item() for x, y in zip(a.attentions, b.attentions)) < 1e-6
        assert b.hidden_states is None and ours(ids, use_cache=False).attentions is None
        tup = ours(ids, labels=ids, return_dict=False, use_cache=False)
        assert isinstance(tup, tuple) and tup[0].ndim == 0 and tup[1].shape == (2, 9, 96)
        base = ours.model(ids, return_dict=False, use_cache=False)
        assert isinstance(base, tuple) and base[0].shape == (2, 9, 64)
    out = ours.generate(ids[:1], max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                        output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.hidden_states[0]) == 6 and len(out.attentions[1]) == 2
    with pytest.raises(TypeError, match="unsupported argument"):
        ours(ids, not_an_argument=1)


def test_activation_checkpointing_api_recomputes_with_equal_gradients(pair):
    _, _, path = pair
    model = ZooLfm2ForCausalLM.from_pretrained(path).train()
    ids = ids_of(2, 10)
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()], len(calls)

    plain, n_plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    ckpt, n_ckpt = grads()
    assert (n_plain, n_ckpt) == (5, 10)  # every layer ran again in backward
    assert max((a - b).abs().max().item() for a, b in zip(plain, ckpt)) < 1e-6
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and grads()[1] == 5


# ---------------------------------------------------------------------------------------------- generation / cache


def test_generation_with_the_hybrid_cache(pair, monkeypatch):
    from transformers import Cache, DynamicCache

    from zoo.language import hybrid
    from zoo.language.hybrid import HybridStaticCache

    ref, ours, path = pair
    prompt = ids_of(1, 6, seed=5)
    greedy = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy, ref.generate(prompt, max_new_tokens=12, do_sample=False))
    # assisted decoding (a zoo assistant on identical weights: all drafts accepted, far fewer target forwards)
    calls = []
    hook = ours.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assistant = ZooLfm2ForCausalLM.from_pretrained(path).eval()
        assisted = ours.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    finally:
        hook.remove()
    assert torch.equal(assisted, greedy) and len(calls) < 12
    # an assistant with other weights: its drafts are rejected, and both caches are rolled back across forwards
    crops = []
    crop = hybrid._HybridCacheState.crop
    monkeypatch.setattr(hybrid._HybridCacheState, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    other = ZooLfm2ForCausalLM(ours.config).eval()
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=other), greedy)
    assert min(crops) < 0  # drafts were rejected and rolled back
    # prompt-lookup decoding: drafts come from the prompt and are mostly rejected, so the cache is rolled back often
    rep = torch.cat([prompt, greedy[:, 6:10], prompt], 1)
    want = ours.generate(rep, max_new_tokens=10, do_sample=False)
    crops.clear()
    assert torch.equal(ours.generate(rep, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3), want)
    assert min(crops) < 0
    # continuation from a returned cache (a transformers Cache)
    first = ours.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.cache, Cache) and first.cache.get_seq_length() == 10
    assert torch.equal(ours.generate(first.sequences, cache=first.cache, max_new_tokens=7, do_sample=False), greedy)
    # static cache
    out = ours.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static",
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy) and isinstance(out.cache, HybridStaticCache)
    assert out.cache.get_max_length() == 17 and out.cache.layers[1].k.shape[2] == 17  # the last token is never fed
    with pytest.raises(ValueError, match="'dynamic' \\(default\\) or 'static'"):
        ours.generate(prompt, max_new_tokens=2, cache_implementation="offloaded")
    # an empty DynamicCache is accepted; a filled foreign cache is refused with a clear message
    assert torch.equal(ours.generate(prompt, cache=DynamicCache(), max_new_tokens=12, do_sample=False), greedy)
    filled = ref(prompt, use_cache=True).cache
    with pytest.raises(TypeError, match="cannot be continued"):
        ours(prompt, cache=filled)
    # inputs_embeds, a pad id inside the prompt (generate infers a mask with a hole), beam search
    emb = ours.get_input_embeddings()(prompt)
    assert torch.equal(ours.generate(inputs_embeds=emb, max_new_tokens=12, do_sample=False), greedy[:, 6:])
    holed = prompt.clone()
    holed[0, 2] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(holed, **kw), ref.generate(holed, **kw))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_cache_rollback_needs_recording(pair):
    _, ours, _ = pair
    ids = ids_of(1, 12)
    with torch.no_grad():
        full = ours(ids, use_cache=False).logits
        cache = ours(ids[:, :5]).cache
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            ours(ids[:, 5:7], cache=cache).cache.crop(-1)
        cache = ours(ids[:, :5]).cache
        cache.activate_past_recording()
        assert cache.is_croppable
        for t in range(5, 9):
            ours(ids[:, t:t + 1], cache=cache)
        ours(ids[:, 9:11], cache=cache)
        cache.crop(-4)  # back to 7 positions, across several forwards
        assert cache.get_seq_length() == 7
        rest = ours(ids[:, 7:], cache=cache).logits
    assert small(rest - full[:, 7:], full)


def test_prepare_inputs_for_generation_keeps_extra_kwargs(pair):
    _, ours, _ = pair
    inputs = ours.prepare_inputs_for_generation(ids_of(1, 4), use_cache=True, my_flag=3)
    assert inputs["my_flag"] == 3 and inputs["use_cache"] is True


# ---------------------------------------------------------------------------------------------- base model, plans, export


def test_base_model_and_parallel_plans(pair, tmp_path):
    _, ours, path = pair
    base = ZooLfm2Model.from_pretrained(path).eval()
    ref_base = transformers.Lfm2Model.from_pretrained(path).eval()
    ids = ids_of(2, 8)
    with torch.no_grad():
        want = ref_base(ids).last_hidden_state
        assert small(base(ids).last_hidden_state - want, want)
    ours.save_pretrained(tmp_path)
    auto = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(auto) is ZooLfm2Model and type(ours.get_decoder()) is ZooLfm2Model
    # no tensor-parallel / pipeline plan is declared that the model would not honour
    assert ours.config.base_model_tp_plan is None and ours.config.base_model_pp_plan is None
    assert not ours._tp_plan and not ours._pp_plan


def test_torch_export_with_attention_mask(pair):
    _, ours, _ = pair
    ids = ids_of(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    ep = torch.export.export(ours, (ids,), {"attention_mask": mask, "use_cache": False})
    other = torch.ones_like(mask)
    other[1, :5] = 0
    with torch.no_grad():
        for m in (mask, other):
            got = ep.module()(ids, attention_mask=m, use_cache=False).logits
            assert small(got - ours(ids, attention_mask=m, use_cache=False).logits, got)


def test_save_pretrained_after_decoding_keeps_the_numbers(pair, tmp_path):
    """A batch-1 decode records its step and moves the matrices into one arena (shared storage): saving still
    writes every tensor and a reload gives the same logits."""
    _, ours, _ = pair
    ids = ids_of(1, 5)
    with torch.no_grad():
        ours.generate(ids, max_new_tokens=3, do_sample=False)
        # the packed projections (copies made at the first inference forward) moved into one arena; weights still
        # mapped from the checkpoint file stay there
        q = ours.model.layers[1].self_attn.q_proj.weight
        assert q.untyped_storage().data_ptr() == ours.model.layers[0].feed_forward.w1.weight.untyped_storage().data_ptr()
        want = ours(ids).logits
        ours.save_pretrained(tmp_path)
        back = ZooLfm2ForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=0)
