"""The single-row CPU kernels of zoo.layers.gemv (batch-1 decoding): they compute the stock products' math, rows
independently of thread count and packing, only where they apply, and everything still runs without them.

Documented tolerances (fp32 sums in another order than the stock kernels; products are exact in every path):
fp32 |d| <= 1e-5 * sqrt(K) * max|w||x| scale; bf16 output within 1 bf16 rounding (rel 2^-8) of the fp32 product of the
same bf16 inputs; int8 within 1e-5 relative (fp32 activations) / one bf16 rounding (bf16 activations) of
``x @ (q * scale).T`` computed in fp64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.layers import gemv

SHAPES = ((1, 1), (7, 5), (33, 17), (258, 64), (130, 1040), (3, 4097), (520, 300))  # tails of 1..15, 16-wide, 64-wide


@pytest.fixture(scope="module")
def kernel():
    if not gemv.kernels_available():
        pytest.skip("no AVX512F/BW/VL or no C compiler here: the stock products run (test_fallback_* covers them)")
    n = torch.get_num_threads()
    yield gemv._state["fn"]
    torch.set_num_threads(n)


def _ref(x, w, scale=None):
    y = x.double() @ w.double().T
    return y if scale is None else y * scale.double()


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_match_the_stock_math_on_odd_shapes(kernel, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(threads)
    with torch.inference_mode():
        for n, k in SHAPES:
            w, x = torch.randn(n, k, generator=g), torch.randn(1, 1, k, generator=g)
            y = gemv.linear(x, w)
            assert y.shape == (1, 1, n) and y.dtype == torch.float32
            assert (y.double() - _ref(x, w)).abs().max() <= 1e-5 * k ** 0.5
            torch.testing.assert_close(gemv.linear(x, w, torch.ones(n)), F.linear(x, w, torch.ones(n)),
                                       rtol=1e-5, atol=1e-5 * k ** 0.5)
            wb, xb = w.bfloat16(), x.bfloat16()
            yb = gemv.linear(xb, wb)
            want = _ref(xb, wb)
            assert yb.dtype == torch.bfloat16
            assert ((yb.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6 * k ** 0.5).all()
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            s = torch.rand(n, generator=g) / 127 + 1e-3
            want = _ref(x, q, s)
            assert ((gemv.int8_linear(x, q, s).double() - want).abs() <= 1e-5 * want.abs().max() + 1e-6).all()
            sb = s.bfloat16()
            want = _ref(xb, q, sb)
            got = gemv.int8_linear(xb, q, sb)
            assert got.dtype == torch.bfloat16
            assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-5 * want.abs().max()).all()


def test_rows_do_not_depend_on_threads_or_on_the_rows_around_them(kernel):
    """What makes packed projections and multi-threaded decoding exact: row r of a product is the same bits alone,
    inside a bigger (packed) matrix, and at 1 or 2 threads."""
    g = torch.Generator().manual_seed(0)
    n = 2200  # int8 2.2 MB, bf16 4.5 MB, fp32 9 MB: every kind is split at 2 threads (>= 1 MiB per thread)
    w, x = torch.randn(n, 1024, generator=g), torch.randn(1, 1024, generator=g)
    q = torch.randint(-127, 128, (n, 1024), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g).bfloat16()
    outs = []
    with torch.inference_mode():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append((gemv.linear(x, w), gemv.linear(x.bfloat16(), w.bfloat16()),
                         gemv.int8_linear(x.bfloat16(), q, s)))
        alone = (gemv.linear(x, w[100:103].contiguous()), gemv.int8_linear(x.bfloat16(), q[100:103].contiguous(),
                                                                             s[100:103].contiguous()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(alone[0][0], outs[0][0][0, 100:103]) and torch.equal(alone[1][0], outs[0][2][0, 100:103])


def test_only_single_row_inference_products_use_the_kernel(kernel, monkeypatch):
    calls = []
    monkeypatch.setitem(gemv._state, "fn", lambda *a: (calls.append((a[0], a[8])), kernel(*a))[1])
    with torch.no_grad():
        gemv.linear(torch.randn(1, 64), torch.randn(8, 64))
        gemv.linear(torch.randn(2, 64), torch.randn(8, 64))  # a batch: stock GEMM
        gemv.linear(torch.randn(1, 64, requires_grad=True), torch.randn(8, 64))  # no grad mode: still the kernel
    with pytest.raises(RuntimeError):  # mixed dtypes: the stock product (and its error)
        gemv.linear(torch.randn(1, 64).bfloat16(), torch.randn(8, 64))
    gemv.linear(torch.randn(1, 64, requires_grad=True), torch.randn(8, 64))  # autograd records: stock
    gemv.int8_linear(torch.randn(1, 64).bfloat16(), torch.ones(8, 64, dtype=torch.int8), torch.ones(8).bfloat16())
    assert calls == [(0, 8), (0, 8), (2, 8)]


def test_fallback_without_a_compiler_or_when_switched_off(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 96, generator=g), torch.randn(1, 96, generator=g)
    q = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    s = torch.rand(40, generator=g).bfloat16()
    try:
        monkeypatch.setenv("ZOO_HOME", str(tmp_path))  # no cached build
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        gemv.reset()
        assert not gemv.kernels_available()
        with torch.inference_mode():
            assert torch.equal(gemv.linear(x, w), F.linear(x, w))
            assert torch.equal(gemv.int8_linear(x.bfloat16(), q, s),
                               torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s))
            assert torch.equal(gemv.argmax(w), w.argmax(-1))
        assert not list(tmp_path.iterdir())  # nothing half-built left behind
        monkeypatch.undo()
        monkeypatch.setenv("ZOO_DISABLE_INT8_GEMV", "1")
        gemv.reset()
        if gemv.kernels_available():  # the switch turns off int8 only
            with torch.inference_mode():
                assert torch.equal(gemv.int8_linear(x.bfloat16(), q, s),
                                   torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s))
            assert gemv._state["off"] == {2}
    finally:
        monkeypatch.undo()
        gemv.reset()


def test_rms_norm_kernel_matches_the_module_math(kernel):
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 1, 1024), (1, 16, 64), (3, 1, 37)):
        x, w = torch.randn(*shape, generator=g) * 3, 1 + 0.3 * torch.randn(shape[-1], generator=g)
        with torch.inference_mode():
            torch.testing.assert_close(gemv.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5),
                                       rtol=1e-6, atol=1e-6)
            xb, wb = x.bfloat16(), w.bfloat16()
            h = xb.float()
            want = wb * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
            assert torch.equal(gemv.rms_norm(xb, wb, 1e-5), want)  # same roundings, same bits
    assert gemv.rms_norm(torch.randn(1, 8, requires_grad=True), torch.ones(8), 1e-5) is None  # autograd: module ops


def test_argmax_kernel_gives_torch_argmax_index_with_ties_nan_and_infinities(kernel):
    """generate()'s greedy pick: the index torch.argmax gives (first of equal maxima, first NaN, all -inf -> 0) on
    bf16 / fp32 rows of any length and row stride, without the fp32 copy."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 5, 16, 17, 100, 65536):
            for case in range(6):
                x = torch.randn(4, n, generator=g)
                if case == 1:
                    x = torch.randint(-2, 2, (4, n), generator=g).float()  # many equal maxima
                elif case == 2:
                    x[1, torch.randint(0, n, (2,), generator=g)] = float("nan")
                elif case == 3:
                    x[2], x[0, -1] = float("-inf"), float("inf")
                x = x.to(dtype)
                assert torch.equal(gemv.argmax(x), x.argmax(-1)), (dtype, n, case)
                view = torch.stack([x, x], 1)[:, 1]  # rows of a strided batch, e.g. logits[:, -1]
                assert torch.equal(gemv.argmax(view), view.float().argmax(-1)), (dtype, n, case)
    x = torch.randn(2, 3, 9)
    assert torch.equal(gemv.argmax(x), x.argmax(-1))  # other shapes and dtypes: torch.argmax
    assert torch.equal(gemv.argmax(x.half()[0]), x.half()[0].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_matches_sdpa_with_grouped_heads_padding_and_a_cache_view(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    for b, h, kvh, s, hd in ((2, 8, 2, 37, 64), (1, 4, 4, 1, 20), (1, 6, 3, 130, 48), (1, 18, 1, 33, 128)):
        q = torch.randn(b, h, 1, hd, generator=g).to(dtype)
        buf = torch.randn(2, b, kvh, s + 11, hd, generator=g).to(dtype)  # a KV buffer with spare capacity
        k, v = buf[0, :, :, :s], buf[1, :, :, :s]
        keep = torch.ones(b, s, dtype=torch.bool)
        keep[0, : s // 3] = False  # left padding of row 0 (the newest key stays visible)
        with torch.inference_mode():
            got = gemv.attn_decode(q, k, v, keep[:, None, None], hd**-0.5)
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep[:, None, None],
                                                  scale=hd**-0.5, enable_gqa=True)
        assert got.shape == q.shape and got.dtype == dtype
        tol = 1e-5 if dtype is torch.float32 else 2 ** -8 * want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_step_kernel_matches_the_module_ops_and_shifts_the_state(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    b = 3
    for d, L, with_bias in ((40, 3, True), (1024, 3, False), (16, 2, True), (7, 4, True), (33, 5, True)):  # 5: scalar
        bcx = torch.randn(b, 1, 3 * d, generator=g).to(dtype)
        state = torch.randn(b, L - 1, d, generator=g).to(dtype)
        w = torch.randn(d, 1, L, generator=g).to(dtype)
        bias = torch.randn(d, generator=g).to(dtype) if with_bias else None
        keep = torch.tensor([[True], [False], [True]])
        bb, c, x = bcx.chunk(3, -1)
        y = (bb * x) * keep[..., None].to(dtype)  # what ShortConv.forward does for one token
        window = torch.cat([state, y], 1)
        z = (window * w[:, 0, :].t()).sum(1, keepdim=True)
        want = c * (z + bias if with_bias else z)
        st = state.clone()
        with torch.inference_mode():
            got = gemv.conv_step(bcx, st, w, bias, keep)
        assert torch.equal(st, window[:, 1:]), (d, L)
        if L > 4 and dtype is torch.float32:  # (the scalar loop past 4 taps sums in order; PyTorch may pair terms)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want), (d, L)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_the_module_ops(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 6, 16, generator=g).to(dtype).transpose(1, 2)  # [B, H, 1, hd] as the decode step has it
    ang = torch.randn(2, 1, 1, 16, generator=g)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    want = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    with torch.inference_mode():
        assert torch.equal(gemv.rope(x, cos, sin), want)
        assert torch.equal(gemv.rope(x[:1], cos[:1], sin[:1]), want[:1])


def test_hugepages_keep_the_weights_and_their_products(kernel):
    w = torch.randn(2048, 1024)  # 8 MB: whole 2 MiB pages inside
    x, before = torch.randn(1, 1024), w.clone()
    with torch.inference_mode():
        y = F.linear(x, w)
        gemv.use_hugepages(w)
        gemv.use_hugepages(w)  # once per tensor
        assert torch.equal(w, before)
        torch.testing.assert_close(gemv.linear(x, w), y, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def amx(kernel):
    if gemv._state.get("gemm") is None:
        pytest.skip("no AMX (Sapphire Rapids or later) here: prefills run the stock products "
                    "(test_prompts_run_the_stock_ops_without_amx_or_when_switched_off checks that)")
    return gemv._state["gemm"]


def _close_to_exact(y, x, w):
    """bf16 output within one bf16 rounding of the exact product of the same bf16 inputs, plus fp32 summation noise."""
    want = _ref(x.reshape(-1, x.shape[-1]), w).reshape(y.shape)
    noise = 1e-6 * (x.reshape(-1, x.shape[-1]).abs().double() @ w.abs().double().T).reshape(y.shape)
    return ((y.double() - want).abs() <= want.abs() * 2 ** -8 + noise).all()


@pytest.mark.parametrize("m,n,k", [(16, 32, 32), (37, 64, 96), (300, 2048, 1024), (100, 96, 4608)])
def test_prefill_products_on_amx_match_the_stock_math_for_every_epilogue(amx, m, n, k):
    """Many-row bf16 products (prefill): exact bf16 products summed in fp32, rounded once; the same bits on 1 or 2
    threads; the residual and SiLU epilogues round where the PyTorch ops they replace round (bitwise). (100, 96,
    4608) sums K in chunks through fp32 partials; 37 and 100 rows end in part-filled tiles."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(1, m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    r, b = torch.randn(1, m, n, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    with torch.inference_mode():
        torch.set_num_threads(1)
        y = gemv.prefill_linear(x, w)
        assert y.shape == (1, m, n) and y.dtype == torch.bfloat16 and _close_to_exact(y, x, w)
        torch.set_num_threads(2)
        assert torch.equal(gemv.prefill_linear(x, w), y)
        assert torch.equal(gemv.prefill_linear(x, w, residual=r), r + y)
        gate, up = y.split(n // 2, -1)
        assert torch.equal(gemv.prefill_linear(x, w, silu_mul=True), F.silu(gate) * up)
        yb = gemv.prefill_linear(x, w, b)
        torch.testing.assert_close(yb, F.linear(x, w, b), rtol=2 ** -7, atol=1e-2)
        assert torch.equal(gemv.linear(x, w), y)  # what the Linear layers call for many bf16 rows
        assert torch.equal(gemv.prefill_linear(x[0, :, :].t().contiguous().t(), w), y[0])  # strided rows
        f = n // 2
        if f % 32 == 0 and k % 32 == 0:  # the fused feed-forward: the same bits as its two products
            w2 = (torch.randn(k, f, generator=g) / f ** 0.5).bfloat16()
            h = gemv.prefill_linear(x, w, silu_mul=True)
            rk = torch.randn(1, m, k, generator=g).bfloat16()
            assert torch.equal(gemv.prefill_ffn(x, w, w2), gemv.prefill_linear(h, w2))
            assert torch.equal(gemv.prefill_ffn(x, w, w2, rk), gemv.prefill_linear(h, w2, residual=rk))


def test_prefill_products_apply_only_where_they_can(amx):
    x, w = torch.randn(40, 64).bfloat16(), torch.randn(64, 64).bfloat16()
    with torch.inference_mode():
        assert gemv.prefill_linear(x[:8], w) is None  # a few rows: the stock product
        assert gemv.prefill_linear(x.float(), w.float()) is None  # fp32: the stock product
        assert gemv.prefill_linear(x[:, :48], w[:, :48]) is None  # K % 32
        assert gemv.prefill_linear(x, w[:48]) is None  # N % 32
        assert gemv.prefill_linear(x, w, silu_mul=True, residual=torch.zeros(40, 64).bfloat16()) is None
        assert gemv.prefill_ffn(x, torch.randn(96, 64).bfloat16(), torch.randn(64, 48).bfloat16()) is None  # F % 32
    xg = x.clone().requires_grad_()
    assert gemv.prefill_linear(xg, w) is None  # autograd records: the stock product
    assert F.linear(xg, w).requires_grad and gemv.linear(xg, w).requires_grad


@pytest.mark.parametrize("with_state", [False, True])
def test_conv_prefill_kernel_matches_the_module_ops_and_keeps_the_state(kernel, monkeypatch, with_state):
    """ShortConv over a bf16 prompt in one call: the same bits as its PyTorch ops (first prompt, and a second chunk
    continuing a cached state), the same state left in the cache."""
    from zoo.language.hybrid import ForwardContext, HybridConfig, ShortConv, _HybridCacheState

    torch.manual_seed(0)
    cfg = HybridConfig(hidden_size=40, conv_bias=True, layer_types=["conv"], vocab_size=8)
    conv = ShortConv(cfg, 0).bfloat16().eval()
    x = torch.randn(2, 33, 40).bfloat16()
    state = torch.randn(2, cfg.conv_L_cache - 1, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    runs, calls = {}, []
    fn = gemv._state["conv_prefill"]
    monkeypatch.setitem(gemv._state, "conv_prefill", lambda *a: (calls.append(a[1:5]), fn(*a))[1])
    for name in ("kernel", "ops"):
        if name == "ops":
            monkeypatch.setitem(gemv._state, "conv_prefill", None)
        cache = _HybridCacheState(cfg)
        if with_state:
            cache.layers[0] = state.clone()
        ctx = ForwardContext(positions=torch.zeros(2, 33, dtype=torch.long), pad_mask=None, key_mask=None,
                             past=0, cache=cache)
        with torch.inference_mode():
            runs[name] = conv(x, ctx), cache.layers[0]
    assert calls == [(2, 33, 40, 3)]  # (rows, tokens, channels, taps): the kernel ran once, then the ops
    assert torch.equal(runs["kernel"][0], runs["ops"][0])
    assert torch.equal(runs["kernel"][1], runs["ops"][1])


@pytest.mark.parametrize("b,h,kvh,t,past,hd", [(1, 4, 2, 64, 0, 64), (2, 4, 4, 37, 0, 32), (1, 2, 1, 40, 25, 128)])
def test_prompt_attention_on_amx_matches_sdpa(amx, b, h, kvh, t, past, hd):
    """Causal grouped-query attention of a bf16 prompt (after ``past`` cached keys): within bf16 round-off of fp32
    SDPA on the same inputs, as close as PyTorch's own bf16 SDPA; output laid out [B, T, H, hd]."""
    g = torch.Generator().manual_seed(t)
    s = past + t
    q = torch.randn(b, t, h, hd, generator=g).bfloat16().transpose(1, 2)  # the heads view of a projection
    kv = torch.randn(2, b, kvh, s + 5, hd, generator=g).bfloat16()  # a KV buffer with room: views of its rows
    k, v = kv[0, :, :, :s], kv[1, :, :, :s]
    mask = torch.ones(t, s, dtype=torch.bool).tril(past)
    with torch.inference_mode():
        got = gemv.attn_prefill(q, k, v, hd ** -0.5)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=hd ** -0.5,
                                              enable_gqa=True).transpose(1, 2)
        stock = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5, enable_gqa=True)
    assert got.shape == (b, t, h, hd) and got.dtype == torch.bfloat16
    err, stock_err = (got.float() - want).abs().max().item(), (stock.transpose(1, 2).float() - want).abs().max().item()
    assert err <= 1.5 * stock_err + 1e-3, (err, stock_err)
    with torch.inference_mode():
        assert gemv.attn_prefill(q[:, :, :8], k, v, 1.0) is None  # fewer than 16 queries: SDPA
        cut = slice(0, hd - 16)
        assert gemv.attn_prefill(q[..., cut], k[..., cut], v[..., cut], 1.0) is None  # hd % 32


def test_prompt_rope_kernel_matches_the_module_ops(kernel):
    from zoo.language.hybrid import rotate_half

    g = torch.Generator().manual_seed(0)
    for b, t, h, hd in ((1, 50, 4, 64), (2, 17, 2, 32)):
        x = (3 * torch.randn(b, t, h, hd, generator=g)).bfloat16().transpose(1, 2)
        ang = torch.arange(t).float()[None, :, None] * torch.rand(hd, generator=g)
        cos = ang.cos()[:, None].expand(b, 1, t, hd).bfloat16().contiguous()
        sin = ang.sin()[:, None].expand(b, 1, t, hd).bfloat16().contiguous()
        with torch.inference_mode():
            got = gemv.rope_prompt(x, cos, sin)
            assert torch.equal(got, x * cos + rotate_half(x) * sin) and got.stride() == x.stride()
            assert gemv.rope_prompt(x.float(), cos.float(), sin.float()) is None  # fp32: the module ops


def test_long_prompts_run_in_row_blocks_with_the_same_bits(amx, monkeypatch):
    """Prompts longer than ``_PREFILL_ROWS`` go through the products in row blocks (bounded scratch): rows are
    independent, so the bits are those of one call."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 100, 64, generator=g).bfloat16()
    w13, w2 = torch.randn(128, 64, generator=g).bfloat16(), torch.randn(64, 64, generator=g).bfloat16()
    r, r13 = torch.randn(1, 100, 64, generator=g).bfloat16(), torch.randn(1, 100, 128, generator=g).bfloat16()
    with torch.inference_mode():
        whole = [gemv.prefill_linear(x, w13, residual=r13), gemv.prefill_linear(x, w13, silu_mul=True),
                 gemv.prefill_ffn(x, w13, w2, r)]
        monkeypatch.setattr(gemv, "_PREFILL_ROWS", 32)  # 100 rows: blocks of 32, 32, 32, 4
        blocks = [gemv.prefill_linear(x, w13, residual=r13), gemv.prefill_linear(x, w13, silu_mul=True),
                  gemv.prefill_ffn(x, w13, w2, r)]
    for a, b in zip(whole, blocks):
        assert torch.equal(a, b)


def test_prompts_run_the_stock_ops_without_amx_or_when_switched_off(kernel, monkeypatch):
    """Without AMX (another CPU, or a compiler without it) or with ``ZOO_DISABLE_AMX_GEMM=1`` the prompt kernels step
    aside and the stock PyTorch ops give their exact results."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 40, 64, generator=g).bfloat16(), torch.randn(64, 64, generator=g).bfloat16()
    q, kv = torch.randn(1, 2, 40, 32, generator=g).bfloat16(), torch.randn(1, 1, 40, 32, generator=g).bfloat16()
    for how in ("no AMX", "switched off"):
        with monkeypatch.context() as mp:
            if how == "no AMX":
                for name in ("gemm", "ffn", "attn_prefill"):
                    mp.setitem(gemv._state, name, None)
            else:
                mp.setenv("ZOO_DISABLE_AMX_GEMM", "1")
                gemv.reset()
                assert 9 in (gemv._load() and gemv._state["off"])
            with torch.inference_mode():
                assert gemv.prefill_linear(x, w) is None and gemv.prefill_ffn(x, w, w[:, :32].contiguous()) is None
                assert gemv.attn_prefill(q, kv, kv, 1.0) is None
                assert torch.equal(gemv.linear(x, w), F.linear(x, w))
        gemv.reset()
