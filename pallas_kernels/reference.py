"""Pure-jnp attention, written for clarity: the oracle in tests and the fast path on CPU.

Axes: batch B, query positions T, key positions S, KV heads K, query heads per KV head G,
head_dim D. Queries arrive grouped per KV head, so K/V are never repeated per query head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a row with every key masked (left padding) gives a uniform, not NaN, softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, sm_scale: float
) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: [B, T, K, G, D] queries.
      k, v: [B, K, S, D] keys and values (head-major, the KV cache layout).
      mask: [B, T, S] bool, True where a query may attend to a key; None for no mask.
      sm_scale: multiplier on q·k (usually D ** -0.5).

    Returns:
      [B, T, K, G, D] in q's dtype; scores and softmax are computed in float32.
    """
    if q.shape[1] == 1:
        return _decode_attention(q, k, v, mask, sm_scale=sm_scale)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
    return out.astype(q.dtype)


def _decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, sm_scale: float
) -> jax.Array:
    """One query position (T == 1), as broadcast-multiply and reduce rather than dots.

    On XLA:CPU a dot over the [B, K, S, D] cache makes the compiler transpose or duplicate the
    freshly updated cache (several full copies per layer per step); multiply-reduce fuses
    straight off the updated cache, which then stays in place. Same math as above.
    """
    qf = q[:, 0].astype(jnp.float32) * sm_scale  # [B, K, G, D]
    scores = jnp.sum(qf[:, :, :, None, :] * k[:, :, None].astype(jnp.float32), axis=-1)
    if mask is not None:  # scores [B, K, G, S]
        scores = jnp.where(mask[:, 0][:, None, None], scores, MASK_VALUE)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.sum(e[..., None] * v[:, :, None].astype(jnp.float32), axis=3)  # [B, K, G, D]
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out[:, None].astype(q.dtype)


# --- Layouts of the Pallas kernels: [batch, seq, heads, head_dim] and paged caches. ---


def masked_softmax(scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax over the last axis where `valid`, exactly 0 elsewhere; a row with no valid entry
    gives zeros. Returns (probabilities, row max m, row sum l), m and l with a kept last axis."""
    scores = jnp.where(valid, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid, jnp.exp(scores - m), 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(l > 0, l, 1.0), m, l


def visible_mask(
    t: int,
    s: int,
    *,
    causal: bool,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array | None = None,
) -> jax.Array:
    """[B or 1, T, S] bool: which keys each query sees.

    Causal attention is aligned bottom-right by default: query i sits at absolute position
    i + S - T, so a chunk of T new queries attends to the S - T cached keys before it (T == S is
    ordinary self-attention); `q_offset` places query 0 elsewhere. A sliding window of W keeps
    keys at distance < W behind the query.
    """
    qpos = jnp.arange(t)[:, None] + (s - t if q_offset is None else q_offset)
    kpos = jnp.arange(s)[None, :]
    mask = jnp.ones((t, s), bool)
    if causal:
        mask &= kpos <= qpos
    if sliding_window is not None:
        mask &= qpos - kpos < sliding_window
    mask = mask[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    sm_scale: float,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sliding_window: int | None = None,
    q_offset: int | jax.Array | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention as `flash_attention` computes it, in one dense softmax.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (GQA, MQA, MHA).
      segment_ids: [B, S] (when T == S) or a pair ([B, T], [B, S]); a query sees only keys of
        its own segment (packed or ragged sequences).
      sliding_window: keys further than this many positions behind a query are hidden.
      q_offset: position of query 0 among the keys; default S - T.

    Returns:
      [B, T, H, D] in q's dtype (and the natural-log logsumexp [B, H, T] in float32 when
      `return_lse`). A query that sees no key gets zeros.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    q_seg, kv_seg = _split_segments(segment_ids)
    mask = visible_mask(
        t,
        s,
        causal=causal,
        sliding_window=sliding_window,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        q_offset=q_offset,
    )  # [B|1, T, S]
    qg = q.reshape(b, t, kh, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    probs, m, l = masked_softmax(scores * sm_scale, mask[:, None, None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    out = out.reshape(b, t, h, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out, lse[..., 0].reshape(b, h, t)


def _split_segments(segment_ids):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """One decode query per sequence against its paged KV cache.

    Args:
      q: [B, H, D].
      k_pages, v_pages: [K, num_pages, page_size, D].
      lengths: [B] int32, tokens in each sequence's cache (0 allowed: output zeros).
      block_tables: [B, max_pages_per_seq] int32; entry j is the page holding tokens
        [j * page_size, (j + 1) * page_size). Entries past a sequence's length are ignored.
      k_scales, v_scales: [K, num_pages, page_size] for int8 pages: gathered beside the pages
        and multiplied into them, so only the pages a sequence names are dequantized.

    Returns:
      [B, H, D] in q's dtype.
    """
    b, h, d = q.shape
    kh, _, page_size, _ = k_pages.shape
    g = h // kh
    max_pages = block_tables.shape[1]
    span = max_pages * page_size
    # Gather each sequence's pages in order: [B, K, max_pages * page_size, D].
    k = jnp.moveaxis(k_pages[:, block_tables], 0, 1).reshape(b, kh, span, d)
    v = jnp.moveaxis(v_pages[:, block_tables], 0, 1).reshape(b, kh, span, d)
    if k_scales is not None:
        k = k.astype(jnp.float32) * jnp.moveaxis(k_scales[:, block_tables], 0, 1).reshape(
            b, kh, span, 1
        )
    if v_scales is not None:
        v = v.astype(jnp.float32) * jnp.moveaxis(v_scales[:, block_tables], 0, 1).reshape(
            b, kh, span, 1
        )
    valid = jnp.arange(max_pages * page_size)[None, :] < lengths[:, None]  # [B, S]
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32)) * sm_scale
    probs, _, _ = masked_softmax(scores, valid[:, None, None])
    # Pages past a sequence's end may hold anything (even NaN): select, never multiply.
    v = jnp.where(valid[:, None, :, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v)
    return out.reshape(b, h, d).astype(q.dtype)


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array | int,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """Queries of many sequences packed together, each attending causally to its own pages.

    Args:
      q: [T, H, D] tokens of all sequences, sequence i at rows cu_q_lens[i]:cu_q_lens[i+1].
      k_pages, v_pages: [K, num_pages, page_size, D].
      kv_lens: [S] int32, cached tokens of each sequence *including* this step's queries, which
        are its last q_len tokens (a decode step has q_len 1, a prefill chunk more).
      block_tables: [S, max_pages_per_seq] int32.
      cu_q_lens: [S + 1] int32 offsets into q.
      num_seqs: how many of the S slots are in use; rows past cu_q_lens[num_seqs] give zeros.
      k_scales, v_scales: [K, num_pages, page_size] for int8 pages: page values are multiplied
        by them as each sequence's pages are gathered (an int8 KV cache read in place).

    Returns:
      [T, H, D] in q's dtype.
    """
    t, h, d = q.shape
    kh, _, page_size, _ = k_pages.shape
    g = h // kh
    max_pages = block_tables.shape[1]
    span = max_pages * page_size
    rows = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, rows, side="right") - 1, 0, kv_lens.shape[0] - 1)
    live = rows < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])  # absolute position of each query

    def one_token(args):
        qi, s, p, ok = args  # [H, D], seq, position, live
        k = k_pages[:, block_tables[s]].reshape(kh, span, d).astype(jnp.float32)
        v = v_pages[:, block_tables[s]].reshape(kh, span, d).astype(jnp.float32)
        if k_scales is not None:
            k = k * k_scales[:, block_tables[s]].reshape(kh, span, 1)
        if v_scales is not None:
            v = v * v_scales[:, block_tables[s]].reshape(kh, span, 1)
        kpos = jnp.arange(span)
        valid = (kpos <= p) & (kpos < kv_lens[s]) & ok
        if sliding_window is not None:
            valid &= p - kpos < sliding_window
        sc = (
            jnp.einsum(
                "kgd,ksd->kgs", qi.reshape(kh, g, d).astype(jnp.float32), k.astype(jnp.float32)
            )
            * sm_scale
        )
        probs, _, _ = masked_softmax(sc, valid)
        vv = jnp.where(valid[:, None], v.astype(jnp.float32), 0.0)
        o = jnp.einsum("kgs,ksd->kgd", probs, vv)
        return o.reshape(h, d)

    out = jax.lax.map(one_token, (q, seq, pos, live), batch_size=min(t, 64) or None)
    return out.astype(q.dtype)
