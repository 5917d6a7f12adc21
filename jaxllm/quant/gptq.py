"""GPTQ (Frantar et al., 2022) for the linear layers and a tied embedding table, calibrated on
offline text.

For a layer y = x @ W^T, GPTQ quantizes W [O, I] one input column at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse of the
Hessian H = sum x^T x [I, I] of the layer's inputs on calibration text: it minimises
||X (W - Q)^T||, the output error, rather than ||W - Q||. A tied embedding table gets the
Hessian of `gptq_table` (its head error plus its lookup error).

Each group's grid (absmax scale, or min/max scale and offset) is taken when the sweep reaches
the group, from the weights as compensated so far, unless static groups are asked for; the
result is an ordinary `QuantizedWeight`. The sweep goes one group-wide block of columns at a
time, jit-compiled once per weight shape. Hessians come from one eager pass of the float model
over the calibration windows (every linear layer's inputs recorded on the way).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import JaxLLMError
from jaxllm.model import Transformer
from jaxllm.quant.calibrate import record_linear_inputs
from jaxllm.quant.qtensor import (
    INT4_SCALE_DTYPE,
    QuantizedWeight,
    asymmetric_params,
    check_groups,
    check_scale_bits,
    covering_double_quantized_params,
    quantize,
    quantize_asymmetric_with,
    quantize_double,
    quantize_with_scale,
    rtn_scale,
    super_block_count,
    super_scales,
)

CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-3")


def _group_params(block, bits: int, group: int, symmetric: bool, supers=None):
    """float32 (scale, offset) [O, G] of each group in block [O, G * group]; with `supers`
    (scale_super, offset_super [O, S] over the block's groups), the double-quantized grid.
    Asymmetric grids cover the group (min/max, not round-to-nearest's least-squares codes,
    which may clip the extremes: GPTQ then spreads a clipped weight's error over the later
    columns; SmolLM2 int4-g64+gptq, 2 windows: +51.5% with them, +31.9% covering)."""
    if supers is not None:
        c, k = covering_double_quantized_params(block, group, *supers)
        n = block.shape[1] // group
        rep = n // supers[0].shape[1]
        s = c.astype(jnp.float32) * jnp.repeat(supers[0].astype(jnp.float32), rep, axis=1)
        return s, k.astype(jnp.float32) * jnp.repeat(supers[1].astype(jnp.float32), rep, axis=1)
    if symmetric:
        s = rtn_scale(block, bits, group, jnp.float32 if bits == 8 else INT4_SCALE_DTYPE)
        return s.astype(jnp.float32), jnp.zeros(s.shape, jnp.float32)
    s, o = asymmetric_params(block, group)
    return s.astype(jnp.float32), o.astype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group", "percdamp", "symmetric", "act_order", "static_groups"),
)
def _gptq_sweep(
    w, h, supers=None, *, bits: int, group: int, percdamp: float, symmetric: bool,
    act_order: bool, static_groups: bool,
):  # fmt: skip
    """Returns (error-compensated weights [O, I], scales [O, N], offsets [O, N]):
    round-to-nearest of the weights under the scales (and offsets) is the result.

    The sweep goes a block of `group` columns at a time (GPTQ's lazy batch updates): inside
    a block each column's error goes to the block's later columns, and when the block is
    done its errors reach every later column in one matmul. Group grids are taken from the
    weights as compensated when the sweep enters the group (GPTQ's order) or, with
    `static_groups` (implied by `act_order`, which visits columns out of group order), from
    the original weights before the sweep. `supers`: double-quantized scales' super-scales
    [O, S], fixed before the sweep; each group's scale and offset codes are chosen on them.
    """
    n_out, n_in = w.shape
    n_groups = n_in // group
    diag = jnp.diag(h)
    dead = diag == 0  # inputs never active in calibration: weight 0, Hessian 1
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[None], 0.0, w.astype(jnp.float32))
    h = h + percdamp * jnp.mean(diag) * jnp.eye(n_in)
    static_groups = static_groups or act_order
    # act-order: the columns with the largest Hessian diagonal go first, while the most
    # later columns remain to absorb their error.
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(n_in)
    if static_groups:
        scale, offset = _group_params(w, bits, group, symmetric, supers)
    else:
        scale = jnp.ones((n_out, n_groups), jnp.float32)
        offset = jnp.zeros((n_out, n_groups), jnp.float32)
    w = w[:, perm]
    h = h[perm][:, perm]
    # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j holds column j's error weights.
    hinv = jnp.linalg.inv(h)
    u = jnp.linalg.cholesky((hinv + hinv.T) / 2).T
    qmin, qmax = (-127.0, 127.0) if bits == 8 else ((-8.0, 7.0) if symmetric else (0.0, 15.0))
    cols = jnp.arange(n_in)
    inner = jnp.arange(group)

    def block_body(b, carry):
        w, scale, offset = carry
        start = b * group
        blk = jax.lax.dynamic_slice(w, (0, start), (n_out, group))
        if not static_groups:  # the block is group b, compensated up to here
            sup_b = None
            if supers is not None:  # group b's super-block's super-scales [O, 1]
                at = (0, b // (n_groups // supers[0].shape[1]))
                sup_b = tuple(jax.lax.dynamic_slice(a, at, (n_out, 1)) for a in supers)
            s_b, o_b = _group_params(blk, bits, group, symmetric, sup_b)
            scale = jax.lax.dynamic_update_slice(scale, s_b, (0, b))
            offset = jax.lax.dynamic_update_slice(offset, o_b, (0, b))
        gid = jax.lax.dynamic_slice(perm, (start,), (group,)) // group
        s_cols, o_cols = scale[:, gid], offset[:, gid]  # [O, group]: each column's grid
        u_blk = jax.lax.dynamic_slice(u, (start, 0), (group, n_in))  # [group, I]
        u_in = jax.lax.dynamic_slice(u_blk, (0, start), (group, group))

        def col_body(j, c):
            blk, errs = c
            col, s, o = blk[:, j], s_cols[:, j], o_cols[:, j]
            dq = jnp.clip(jnp.round((col - o) / s), qmin, qmax) * s + o
            err = (col - dq) / u_in[j, j]
            blk = blk - jnp.outer(err, jnp.where(inner > j, u_in[j], 0.0))
            return blk.at[:, j].set(dq), errs.at[:, j].set(err)

        blk, errs = jax.lax.fori_loop(0, group, col_body, (blk, jnp.zeros_like(blk)))
        later = jnp.where(cols[None] >= start + group, u_blk, 0.0)
        w = jax.lax.dynamic_update_slice(w - errs @ later, blk, (0, start))
        return w, scale, offset

    w, scale, offset = jax.lax.fori_loop(0, n_groups, block_body, (w, scale, offset))
    w = w[:, jnp.argsort(perm)]
    if supers is not None:  # float32 decoded grids, exact multiples of the super-scales
        return w, scale, offset
    scale_dtype = jnp.float32 if bits == 8 else INT4_SCALE_DTYPE
    return w, scale.astype(scale_dtype), offset.astype(scale_dtype)


def _sweep_super_scales(w, sweep, group: int, blocks: int) -> tuple[jax.Array, jax.Array]:
    """Super-scales [O, S] wide enough for the original weights w [O, I] and for the weights
    a float16-grid sweep meets: compensation pushes some groups past the original range, and
    super-scales from w alone then saturate their codes, clipping those weights (SmolLM2
    int4-g64+gptq, 2 windows: +31.9% with super-scales from w, +29.5% with these)."""
    compensated, _, _ = sweep(w, supers=None)  # on each group's covering float16 grid
    pairs = zip(super_scales(w, group, blocks), super_scales(compensated, group, blocks))
    return tuple(jnp.maximum(a, b) for a, b in pairs)


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    bits: int,
    group: int | None,
    percdamp: float = 0.01,
    symmetric: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    scale_bits: int | None = None,
    scale_block: int | None = None,
) -> QuantizedWeight:
    """GPTQ of w [O, I] for inputs with Hessian h [I, I]; same layout as `quantize`.

    percdamp: damping added to H's diagonal, as a fraction of its mean. act_order: quantize
    columns in order of decreasing H diagonal (needs static groups). static_groups: grids
    from the original weights instead of the compensated ones. scale_bits=8, scale_block:
    double-quantized scales as in `quantize`, the super-scales fixed before the sweep
    (`_sweep_super_scales`), each group's codes covering the group when the sweep reaches it.
    """
    g = check_groups(w.shape, group)
    blocks = None
    if scale_bits is not None:
        check_scale_bits(scale_bits, bits, symmetric, "weight")
        blocks = super_block_count(w.shape[1] // g, scale_block)
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    return _gptq(w, h, bits, g, percdamp, symmetric, act_order, static_groups, blocks)


# One program per (shape, settings): op by op, the super-scales and the double-quantized codes
# around the jitted sweep were ~300 XLA compiles, and int4-g32+gptq on SmolLM2 took 117 s.
@functools.partial(jax.jit, static_argnums=tuple(range(2, 9)))
def _gptq(
    w: jax.Array, h: jax.Array, bits: int, g: int, percdamp: float, symmetric: bool,
    act_order: bool, static_groups: bool, blocks: int | None,
) -> QuantizedWeight:  # fmt: skip
    sweep = functools.partial(
        _gptq_sweep, h=h, bits=bits, group=g, percdamp=percdamp, symmetric=symmetric,
        act_order=act_order, static_groups=static_groups,
    )  # fmt: skip
    supers = None if blocks is None else _sweep_super_scales(w, sweep, g, blocks)
    wc, scale, offset = sweep(w, supers=supers)
    if supers is not None:
        n = w.shape[1] // g
        rep = n // supers[0].shape[1]
        c = jnp.round(scale / jnp.repeat(supers[0].astype(jnp.float32), rep, axis=1))
        k = jnp.round(offset / jnp.repeat(supers[1].astype(jnp.float32), rep, axis=1))
        return quantize_double(wc, g, *supers, params=(c.astype(jnp.uint8), k.astype(jnp.int8)))
    if symmetric:
        return quantize_with_scale(wc, scale, bits, g)
    return quantize_asymmetric_with(wc, scale, offset, g)


def collect_hessians(model: Transformer, windows: Sequence[Sequence[int]]) -> dict[str, jax.Array]:
    """H [I, I] of every linear layer's inputs over the calibration windows (float model)."""

    def add_gram(h, x):
        return x.T @ x if h is None else h + x.T @ x

    return record_linear_inputs(model, windows, add_gram)


def calibration_windows(ids: Sequence[int], window: int = 512, count: int = 4) -> list[list[int]]:
    """The last `count` whole windows of `ids` (an evaluation on the first windows of the same
    text stays disjoint from them while it uses fewer than len(ids) // window - count)."""
    n = len(ids) // window
    if n < count:
        raise JaxLLMError(f"calibration text has {len(ids)} tokens, fewer than {count} windows")
    return [list(ids[i * window : (i + 1) * window]) for i in range(n - count, n)]


def default_calibration(tokenizer, cfg) -> list[list[int]]:
    """Offline calibration: the last 4 windows of 512 tokens of GPL-3 (shipped with Debian)."""
    if tokenizer is None or not CALIBRATION_TEXT.is_file():
        raise JaxLLMError(
            f"GPTQ needs calibration text: a tokenizer and {CALIBRATION_TEXT} (not found)"
        )
    window = min(512, cfg.max_position_embeddings)
    return calibration_windows(tokenizer.encode(CALIBRATION_TEXT.read_text()), window)


def gptq_quantizer(
    model: Transformer,
    windows: Sequence[Sequence[int]],
    log=print,
    table_alpha: float | None = None,
) -> Callable[..., QuantizedWeight]:
    """A `Quantizer` for `quantize_model` that runs GPTQ with Hessians from `windows`.

    A tied embedding ("embed") gets GPTQ under `gptq_table.table_hessian` with `table_alpha`
    (default `gptq_table.DEFAULT_ALPHA`); an untied one, a lookup table only, is rounded to
    nearest. Each matrix keeps whichever of GPTQ and round-to-nearest has the lower GPTQ
    objective on the calibration Hessian: weights already on the target grid (SmolLM2's Q4_1
    layers under int4-g32) round exactly, and GPTQ's regridding would only move them off it.
    """
    from jaxllm.quant.gptq_table import DEFAULT_ALPHA, hessian_error, table_hessian

    log(f"[jaxllm] GPTQ: collecting Hessians over {len(windows)} calibration windows")
    hessians = collect_hessians(model, windows)
    if "embed" in hessians:
        n_tokens = sum(len(ids) for ids in windows)
        alpha = DEFAULT_ALPHA if table_alpha is None else table_alpha
        hessians["embed"] = table_hessian(hessians["embed"], n_tokens, alpha)
    kept = {"gptq": 0, "rtn": 0}

    def quantizer(
        name: str,
        w: jax.Array,
        bits: int,
        group: int | None,
        symmetric: bool = True,
        **scales,
    ) -> QuantizedWeight:
        """`scales`: scale_bits and scale_block, as `quantize` takes them."""
        check_groups(w.shape, group, name)
        rtn = quantize(w, bits, group, name=name, symmetric=symmetric, **scales)
        if name not in hessians:  # a lookup-only table: identity Hessian, where GPTQ is RTN
            return rtn
        h = hessians[name]
        qw = gptq_quantize(w, h, bits, group, symmetric=symmetric, **scales)
        better = hessian_error(w, qw, h) < hessian_error(w, rtn, h)
        kept["gptq" if better else "rtn"] += 1
        if name == "embed":
            log(f"[jaxllm] GPTQ: kept {kept['gptq']} GPTQ and {kept['rtn']} RTN matrices")
        return qw if better else rtn

    return quantizer


def output_error(w: np.ndarray, qw: QuantizedWeight, x: np.ndarray) -> float:
    """||x (W - dq(Q))^T||^2: what GPTQ minimises (for tests and reports)."""
    from jaxllm.quant.qtensor import dequantize

    d = np.asarray(w, np.float32) - np.asarray(dequantize(qw))
    return float(np.sum((np.asarray(x, np.float32) @ d.T) ** 2))
