"""Pallas kernels in interpret mode against their jnp references (and jax's own oracles).

The default run covers every factor of the issue's matrix (dtype, heads/kv_heads, head_dim,
lengths) at least once; the full product is `slow`. Tolerances: float32 2e-5 absolute on
outputs (gradients: relative to their largest entry); bfloat16 3e-2, the rounding of a bf16
output of magnitude ~2 plus the kernel's bf16 probabilities in P·V.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import (
    flash_attention_reference,
    paged_attention_reference,
    ragged_paged_attention_reference,
)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


# The suite is compile-bound on CPU: every eager jnp op on a new shape is its own XLA compile.
# So the checks below compare in numpy, draw inputs with numpy, and run each kernel and its
# reference as one jitted program (the same kernels and references, compiled once per case).


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def normal(seed: int, shape: tuple, dtype) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def qkv(b, t, s, h, kh, d, dtype, seed=0):
    return (
        normal(4 * seed, (b, t, h, d), dtype),
        normal(4 * seed + 1, (b, s, kh, d), dtype),
        normal(4 * seed + 2, (b, s, kh, d), dtype),
        normal(4 * seed + 3, (b, t, h, d), dtype),
    )


def output_and_grads(f, q, k, v, do):
    """f's plain output, and the gradients of sum(f(q, k, v) * do), from one jitted program."""

    def loss(*a):
        return jnp.sum(f(*a).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)


def check_flash(b, t, s, h, kh, d, dtype, *, causal, window=None, segments=False, grads=True):
    q, k, v, do = qkv(b, t, s, h, kh, d, dtype)
    seg = None
    if segments:  # three ragged segments per row, cut at different places per batch entry

        def cut(n):
            pos, row = jnp.arange(n)[None], jnp.arange(b)[:, None]
            return ((pos >= n // 3 + 5 * row).astype(jnp.int32) + (pos >= 2 * n // 3)).astype(
                jnp.int32
            )

        seg = (cut(t), cut(s)) if t != s else cut(t)
    kw = dict(causal=causal, segment_ids=seg, sliding_window=window)
    ours = lambda q, k, v: flash_attention(q, k, v, block_sizes=SMALL, **kw)
    ref = lambda q, k, v: flash_attention_reference(q, k, v, sm_scale=d**-0.5, **kw)
    tol = TOL[dtype]
    if not grads:
        assert max_err(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)) <= tol
        return
    out, g_ours = output_and_grads(ours, q, k, v, do)
    want, g_ref = output_and_grads(ref, q, k, v, do)
    assert max_err(out, want) <= tol
    for name, a, r in zip("qkv", g_ours, g_ref):
        scale = float(np.max(np.abs(np.asarray(r, np.float32)))) or 1.0
        assert max_err(a, r) <= tol * scale * (4 if dtype == jnp.bfloat16 else 1), name


# (b, t, s, heads, kv_heads, head_dim, dtype, causal): every factor at least once.
FLASH_CASES = [
    (1, 40, 40, 8, 8, 64, jnp.float32, True),  # MHA, non-multiple of the tile
    (2, 33, 50, 8, 2, 128, jnp.float32, True),  # GQA, T < S: bottom-right causal
    (1, 1, 37, 8, 1, 64, jnp.float32, True),  # MQA, a single query (decode)
    (1, 48, 48, 9, 3, 64, jnp.bfloat16, False),  # 9/3 heads, bf16, not causal
    # bf16, causal, GQA and D=128 together (each alone is above): slow
    pytest.param(1, 32, 32, 8, 2, 128, jnp.bfloat16, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("b,t,s,h,kh,d,dtype,causal", FLASH_CASES)
def test_flash_attention_matches_reference(b, t, s, h, kh, d, dtype, causal):
    check_flash(b, t, s, h, kh, d, dtype, causal=causal)


def test_flash_attention_segments_and_window():
    check_flash(2, 48, 48, 8, 2, 64, jnp.float32, causal=True, segments=True)
    check_flash(1, 48, 48, 6, 2, 64, jnp.float32, causal=True, window=9)
    check_flash(1, 20, 44, 4, 1, 64, jnp.float32, causal=False, segments=True, grads=False)


def test_flash_attention_fully_masked_rows_are_zero():
    """Queries whose segment has no keys get zeros, not NaN, in both outputs and gradients."""
    q, k, v, _ = qkv(1, 16, 16, 4, 2, 64, jnp.float32)
    seg_q = jnp.array([[0] * 8 + [1] * 8], jnp.int32)
    seg_k = jnp.zeros((1, 16), jnp.int32)
    f = lambda q, k, v: flash_attention(q, k, v, causal=False, segment_ids=(seg_q, seg_k))
    out, g = output_and_grads(f, q, k, v, jnp.ones_like(q))
    assert np.all(np.asarray(out)[:, 8:] == 0.0)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_flash_attention_matches_jax_mha_oracle():
    """jax's own Pallas flash attention (interpret mode) on an MHA shape with segments."""
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    q, k, v, _ = qkv(2, 64, 64, 4, 4, 64, jnp.float32, seed=3)
    seg = (jnp.arange(64)[None] >= jnp.array([[20], [50]])).astype(jnp.int32)
    oracle = lambda q, k, v, seg: jax_attention.mha(
        q, k, v, seg, sm_scale=0.125, causal=True, interpret=True,
        block_sizes=jax_attention.BlockSizes(block_q=32, block_k=32),
    )  # fmt: skip
    want = jax.jit(oracle)(q, k, v, seg)
    ours = lambda q, k, v, seg: flash_attention(
        q, k, v, causal=True, sm_scale=0.125, segment_ids=seg
    )
    got = jax.jit(ours)(q, k, v, seg)
    assert max_err(got, want) <= 1e-5


def test_flash_attention_memory_is_linear_in_sequence():
    """Compiled temporary memory doubles (not quadruples) when the sequence doubles; the dense
    reference quadruples, which shows the measurement can tell the two apart."""

    def temp(fn, s):
        x = jax.ShapeDtypeStruct((1, s, 4, 64), jnp.float32)
        return jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    ours = lambda q, k, v: flash_attention(q, k, v, causal=True)
    dense = lambda q, k, v: flash_attention_reference(q, k, v, causal=True, sm_scale=0.125)
    assert temp(ours, 2048) / temp(ours, 1024) < 2.5
    assert temp(dense, 2048) / temp(dense, 1024) > 3.5


def test_flash_attention_rejects_bad_shapes():
    q, k, v, _ = qkv(1, 8, 8, 6, 4, 64, jnp.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        flash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="sliding_window"):
        flash_attention(q, k[:, :, :2], v[:, :, :2], causal=True, sliding_window=0)


# ---------------------------------------------------------------------------------------------
# Paged caches: pages shuffled, unused pages NaN, block-table entries past a sequence's end are
# out-of-range garbage, and the unused tail slots of a last page hold large finite garbage.


def make_paged(h, kh, d, page, kv_lens, dtype, num_pages=None, seed=0):
    rng = np.random.default_rng(seed)
    pages_of = [-(-n // page) for n in kv_lens]
    max_pages = max(1, max(pages_of))
    num_pages = num_pages or sum(pages_of) + 5
    kp = np.full((kh, num_pages, page, d), np.nan, np.float32)
    vp = kp.copy()
    tables = rng.integers(10**6, 2 * 10**6, (len(kv_lens), max_pages)).astype(np.int32)
    order = iter(rng.permutation(num_pages))
    for i, n in enumerate(kv_lens):
        for j in range(pages_of[i]):
            p = next(order)
            tables[i, j] = p
            kp[:, p] = rng.standard_normal((kh, page, d))
            vp[:, p] = rng.standard_normal((kh, page, d))
            used = n - j * page
            if used < page:
                kp[:, p, used:] = 1e4
                vp[:, p, used:] = -1e4
    return (
        jnp.asarray(kp, dtype),
        jnp.asarray(vp, dtype),
        jnp.asarray(kv_lens, jnp.int32),
        jnp.asarray(tables),
    )


# (heads, kv_heads, head_dim, page, lengths, dtype, num_splits)
PAGED_CASES = [
    (8, 2, 64, 16, [0, 1, 37, 100], jnp.float32, None),
    (9, 3, 128, 16, [100, 17], jnp.float32, 2),
    (8, 1, 64, 8, [5, 64, 65, 0], jnp.bfloat16, 3),
    (8, 8, 128, 16, [33, 16, 1], jnp.bfloat16, 1),
]


@pytest.mark.parametrize("h,kh,d,page,lengths,dtype,splits", PAGED_CASES)
def test_paged_attention_matches_reference(h, kh, d, page, lengths, dtype, splits):
    kp, vp, lens, tables = make_paged(h, kh, d, page, lengths, dtype)
    q = normal(101, (len(lengths), h, d), dtype)
    ours = lambda *a: paged_attention(*a, num_splits=splits, pages_per_block=2)
    got = np.asarray(jax.jit(ours)(q, kp, vp, lens, tables), np.float32)
    ref = lambda *a: paged_attention_reference(*a, sm_scale=d**-0.5)
    want = jax.jit(ref)(q, kp, vp, lens, tables)
    assert not np.isnan(got).any()
    assert max_err(got, want) <= TOL[dtype]
    assert np.all(got[np.asarray(lens) == 0] == 0.0)


def test_paged_attention_matches_jax_decode_oracle():
    """jax's Pallas GQA decode kernel (interpret) over the same cache made contiguous."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    h, kh, d, page, lengths = 8, 2, 64, 16, [128, 77, 1]
    kp, vp, lens, tables = make_paged(h, kh, d, page, lengths, jnp.float32)
    q = normal(102, (3, h, d), jnp.float32)
    # Contiguous [B, S, K, D] copy; slots past each length zeroed (jax's kernel masks by length).
    dense = lambda pages: jnp.moveaxis(pages[:, tables], 0, 3).reshape(3, -1, kh, d)
    valid = (jnp.arange(tables.shape[1] * page)[None] < lens[:, None])[..., None, None]
    k = jnp.where(valid, dense(kp), 0.0)
    v = jnp.where(valid, dense(vp), 0.0)
    oracle = lambda q, k, v, lens: decode_attention.gqa(
        q, k, v, kv_seq_len=lens, interpret=True, k_splits=2, block_k=32
    )
    want = jax.jit(oracle)(q, k, v, lens)
    got = jax.jit(paged_attention)(q, kp, vp, lens, tables)
    assert max_err(got, want) <= 1e-5


# (heads, kv_heads, head_dim, page, kv_lens, q_lens, dtype)
RAGGED_CASES = [
    (8, 2, 64, 16, [1, 37, 50, 20], [1, 5, 50, 0], jnp.float32),
    (9, 3, 128, 16, [100, 17], [1, 17], jnp.float32),
    (8, 1, 64, 8, [5, 64, 65], [5, 1, 33], jnp.bfloat16),
    (8, 8, 64, 16, [40, 16, 3], [40, 3, 1], jnp.bfloat16),
]


def ragged_inputs(h, kh, d, page, kv_lens, q_lens, dtype, pad=3):
    kp, vp, lens, tables = make_paged(h, kh, d, page, kv_lens, dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = normal(103, (int(cu[-1]) + pad, h, d), dtype)
    return q, kp, vp, lens, tables, cu


@pytest.mark.parametrize("h,kh,d,page,kv_lens,q_lens,dtype", RAGGED_CASES)
def test_ragged_paged_attention_matches_reference(h, kh, d, page, kv_lens, q_lens, dtype):
    args = ragged_inputs(h, kh, d, page, kv_lens, q_lens, dtype)
    n = len(kv_lens)
    ours = lambda *a: ragged_paged_attention(*a, n, block_q=4, pages_per_block=2)
    got = np.asarray(jax.jit(ours)(*args), np.float32)
    ref = lambda *a: ragged_paged_attention_reference(*a, n, sm_scale=d**-0.5)
    want = jax.jit(ref)(*args)
    assert not np.isnan(got).any()
    assert max_err(got, want) <= TOL[dtype]
    assert np.all(got[int(args[-1][-1]) :] == 0.0)  # rows past the last sequence


def test_ragged_paged_attention_window_and_unused_slots():
    args = ragged_inputs(8, 2, 64, 16, [40, 16, 9], [40, 3, 2], jnp.float32)
    ours = lambda *a: ragged_paged_attention(*a, 2, sliding_window=7)  # third seq not in use
    ref = lambda *a: ragged_paged_attention_reference(*a, 2, sm_scale=0.125, sliding_window=7)
    got = np.asarray(jax.jit(ours)(*args))
    assert max_err(got, jax.jit(ref)(*args)) <= 2e-5
    assert np.all(got[43:] == 0.0)


def test_ragged_paged_attention_matches_jax_tpu_oracle():
    """`ref_ragged_paged_attention` from jax's TPU ops (K/V pages combined, interleaved)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

    kv_lens, q_lens = [50, 17, 33], [10, 1, 33]
    q, kp, vp, lens, tables, cu = ragged_inputs(8, 2, 64, 16, kv_lens, q_lens, jnp.float32)
    # jax's layout: [pages, page_size, 2 * K, D], K and V interleaved per head.
    combined = jnp.stack([kp, vp], axis=1).reshape(4, *kp.shape[1:])  # [2K, P, page, D]
    combined = jnp.transpose(combined, (1, 2, 0, 3))
    safe_tables = jnp.where(tables < kp.shape[1], tables, 0)
    want = rpa.ref_ragged_paged_attention(
        q, combined, lens, safe_tables, cu, jnp.array([3], jnp.int32), sm_scale=0.125
    )
    got = jax.jit(lambda *a: ragged_paged_attention(*a, 3))(q, kp, vp, lens, tables, cu)
    assert max_err(got[: int(cu[-1])], want) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Lowering for real GPUs needs no GPU: the Pallas GPU lowering runs in Python at lower time.


def test_kernels_lower_for_cuda():
    S = jax.ShapeDtypeStruct
    lower = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
    q, kv = S((1, 256, 8, 128), jnp.bfloat16), S((1, 256, 2, 128), jnp.bfloat16)
    fwd = lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False, platform="gpu")
    assert "flash_attention_fwd" in lower(fwd, q, kv, kv)
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    text = lower(grad, q, kv, kv)
    assert "flash_attention_dkv" in text and "flash_attention_dq" in text
    pages, i32 = S((2, 64, 16, 128), jnp.bfloat16), jnp.int32
    dec = lambda *a: paged_attention(*a, interpret=False, platform="gpu")
    decode_args = (S((4, 8, 128), jnp.bfloat16), pages, pages, S((4,), i32), S((4, 16), i32))
    assert "paged_attention" in lower(dec, *decode_args)
    rag = lambda *a: ragged_paged_attention(*a, 4, interpret=False, platform="gpu")
    ragged_args = (S((64, 8, 128), jnp.bfloat16), pages, pages, S((4,), i32), S((4, 16), i32))
    assert "ragged_paged_attention" in lower(rag, *ragged_args, S((5,), i32))


# ---------------------------------------------------------------------------------------------
# The full matrix of the issue (slow).


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,heads,d,t",
    list(
        itertools.product(
            [jnp.float32, jnp.bfloat16], [(8, 8), (8, 2), (8, 1), (9, 3)], [64, 128], [1, 17, 64]
        )
    ),  # fmt: skip
)
def test_full_matrix(dtype, heads, d, t):
    h, kh = heads
    check_flash(1, t, t + 7, h, kh, d, dtype, causal=True)
    kp, vp, lens, tables = make_paged(h, kh, d, 16, [0, t, t + 40], dtype)
    q = normal(100, (3, h, d), dtype)
    got = paged_attention(q, kp, vp, lens, tables, num_splits=2, pages_per_block=1)
    assert (
        max_err(got, paged_attention_reference(q, kp, vp, lens, tables, sm_scale=d**-0.5))
        <= (TOL[dtype])
    )
    args = ragged_inputs(h, kh, d, 16, [t, t + 40, 5], [t, 1, 5], dtype)
    got = ragged_paged_attention(*args, 3)
    want = ragged_paged_attention_reference(*args, 3, sm_scale=d**-0.5)
    assert max_err(got, want) <= TOL[dtype]


def test_flash_attention_head_major_kv_and_traced_offset():
    """kv_layout="bksd" reads a [B, K, S, D] cache in place; q_offset (traced) places a chunk
    of queries at cache slot c: the same as the reference over the first c + T keys."""
    q, k, v, do = qkv(2, 10, 50, 8, 2, 64, jnp.float32)
    c = 20
    ref = lambda q, k, v: flash_attention_reference(
        q, k[:, : c + 10], v[:, : c + 10], causal=True, sm_scale=0.125
    )
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    @jax.jit
    def ours(q, kt, vt, c):
        return flash_attention(
            q, kt, vt, causal=True, q_offset=c, kv_layout="bksd", block_sizes=SMALL
        )

    assert max_err(ours(q, kt, vt, jnp.int32(c)), jax.jit(ref)(q, k, v)) <= 2e-5
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2)))
    dq, dkt, dvt = map(np.asarray, grads(ours)(q, kt, vt, jnp.int32(c)))
    rq, rk, rv = grads(ref)(q, k, v)
    assert max_err(dq, rq) <= 2e-5
    assert max_err(dkt.transpose(0, 2, 1, 3), rk) <= 2e-5
    assert max_err(dvt.transpose(0, 2, 1, 3), rv) <= 2e-5
    assert np.all(dkt[:, :, c + 10 :] == 0.0)


# ---------------------------------------------------------------------------------------------
# TPU family: Mosaic TPU interpreter (out-of-bounds reads raise, fresh memory is NaN) and the
# Mosaic lowering itself, both on CPU.


def test_tpu_flash_forward_interpret():
    def check(q, k, v, block_sizes=None, **kw):
        ours = lambda *a: flash_attention(
            *a, platform="tpu", interpret=True, block_sizes=block_sizes, **kw
        )
        ref = lambda *a: flash_attention_reference(*a, sm_scale=128**-0.5, **kw)
        assert max_err(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)) <= 2e-5

    q, k, v, _ = qkv(1, 40, 200, 4, 2, 128, jnp.float32)
    check(q, k, v, BlockSizes(block_q=16), causal=True, sliding_window=70)
    seg = jnp.asarray(np.arange(64)[None] >= 30, jnp.int32)
    q, k, v, _ = qkv(1, 64, 64, 4, 4, 128, jnp.float32)
    check(q, k, v, causal=False, segment_ids=seg)


def test_tpu_paged_attention_interpret_reads_only_live_pages():
    """Block-table entries past each length are out-of-range page ids: the TPU interpreter
    raises on any such DMA, and unused pages are NaN."""
    kp, vp, lens, tables = make_paged(9, 3, 128, 16, [0, 1, 37, 200], jnp.float32)
    q = normal(101, (4, 9, 128), jnp.float32)
    ours = lambda *a: paged_attention(*a, platform="tpu", interpret=True)
    ref = lambda *a: paged_attention_reference(*a, sm_scale=128**-0.5)
    args = (q, kp, vp, lens, tables)
    assert max_err(jax.jit(ours)(*args), jax.jit(ref)(*args)) <= 2e-5


def test_kernels_lower_for_tpu():
    S = jax.ShapeDtypeStruct
    lower = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=("tpu",)).as_text()
    q, kv = S((1, 1024, 8, 128), jnp.bfloat16), S((1, 1024, 2, 128), jnp.bfloat16)
    fwd = lambda q, k, v, s: flash_attention(
        q, k, v, causal=True, segment_ids=s, sliding_window=300, interpret=False, platform="tpu"
    )
    assert "tpu_custom_call" in lower(fwd, q, kv, kv, S((1, 1024), jnp.int32))
    pages = S((2, 64, 16, 128), jnp.bfloat16)
    dec = lambda *a: paged_attention(*a, interpret=False, platform="tpu")
    decode_args = (S((4, 8, 128), jnp.bfloat16), pages, pages)
    assert "tpu_custom_call" in lower(dec, *decode_args, S((4,), jnp.int32), S((4, 16), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Hopper fast path (Mosaic GPU): the kernel's pipeline (TMA ring, barriers between the producer
# and two compute warpgroups, causal tiles, lse) under the Mosaic GPU interpreter, where the two
# wgmma calls are emulated by dots; and its real lowering, wgmma included.


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_mosaic_gpu_forward_interpret(causal):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from pallas_kernels import flash_attention_mgpu as fm
    from pallas_kernels.flash_attention import _Static

    b, t, s, h, kh, d = 1, 128, 384, 2, 1, 64
    q, k, v, _ = qkv(b, t, s, h, kh, d, jnp.bfloat16)
    st = _Static(causal=causal, sm_scale=d**-0.5, window=None, t=t, s=s, has_segments=False,
                 blocks=BlockSizes(), platform="gpu", interpret=True)  # fmt: skip
    ours = lambda *a: fm.flash_forward_mgpu(*a, st, interpret=InterpretGPUParams())
    ref = lambda *a: flash_attention_reference(*a, causal=causal, sm_scale=d**-0.5, return_lse=True)
    out, lse = jax.jit(ours)(q, k, v)
    want, want_lse = jax.jit(ref)(q, k, v)
    assert max_err(out, want) <= TOL[jnp.bfloat16]
    assert max_err(lse, want_lse) <= 1e-4


def test_mosaic_gpu_forward_lowers_for_cuda():
    from pallas_kernels import flash_attention_mgpu as fm
    from pallas_kernels.flash_attention import _Static

    S = jax.ShapeDtypeStruct
    q, kv = S((1, 1024, 16, 128), jnp.bfloat16), S((1, 1024, 4, 128), jnp.bfloat16)
    st = _Static(
        causal=True, sm_scale=128**-0.5, window=None, t=1024, s=1024, has_segments=False,
        blocks=BlockSizes(), platform="gpu", interpret=False,
    )  # fmt: skip
    lowered = jax.jit(lambda *a: fm.flash_forward_mgpu(*a, st)).trace(q, kv, kv)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()
