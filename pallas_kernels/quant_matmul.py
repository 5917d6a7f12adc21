"""Weight-only int8 matmul for few rows (decode): y = x @ (scale * q)^T.

At batch 1 a linear layer is a GEMV whose time is the time to read its weight, so the codes
stream from memory once, as int8 (half of bf16's bytes), and are widened to float in registers;
products accumulate in float32.

Layouts: x [M, I] (M rows: the tokens of a decode step), codes int8 [O, I] (the model's
[out, in]), scale [O] or [O, 1] (one per output channel) -> y [M, O] in x's dtype.

Programs: one per (tile of `block_o` output channels, split of I). Each loops over its split
in `block_k` chunks. One row multiplies elementwise into a [block_o, block_k] accumulator and
reduces it once at the end (no padding to a tensor-core tile); several rows are padded to 16
(the smallest dot) and use a dot. `num_splits` > 1 gives a narrow O enough programs to keep
every SM streaming; the splits' partial sums are added outside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import cdiv, gpu_compiler_params, next_pow2, resolve_platform

MAX_ROWS = 16  # beyond a few rows the product is compute-bound: leave it to XLA's GEMM
BLOCK_O = 32
BLOCK_K = 256
MIN_BLOCK = 16  # the smallest dot dimension Triton accepts
TARGET_PROGRAMS = 264  # two per SM of an H100 (132 SMs)


def int8_matmul_reference(x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """The oracle: x [M, I] @ (scale [O] * codes [O, I])^T in float32 -> [M, O] in x's dtype."""
    acc = jnp.dot(x.astype(jnp.float32), codes.astype(jnp.float32).T)
    return (acc * scale.reshape(1, -1).astype(jnp.float32)).astype(x.dtype)


def fit_block(n: int, want: int) -> int:
    """The largest power of two <= `want` that divides n, or 0 when it is under MIN_BLOCK."""
    b = 1 << max(0, want.bit_length() - 1)
    while b >= MIN_BLOCK and n % b:
        b //= 2
    return b if b >= MIN_BLOCK else 0


def compiles_on_gpu() -> bool:
    """Whether this jax still has the Triton lowering the kernel is written for."""
    return gpu_compiler_params(4, 3) is not None


def supports(rows: int, n_out: int, n_in: int) -> bool:
    """Whether `int8_matmul` takes these shapes (rows M, codes [O, I]) with its default blocks."""
    return 0 < rows <= MAX_ROWS and fit_block(n_out, BLOCK_O) > 0 and fit_block(n_in, BLOCK_K) > 0


def default_splits(n_out_tiles: int, n_chunks: int) -> int:
    """The fewest power-of-two splits of I that give about TARGET_PROGRAMS programs."""
    splits = 1
    while n_out_tiles * splits < TARGET_PROGRAMS and n_chunks % (2 * splits) == 0:
        splits *= 2
    return splits


def int8_matmul(
    x: jax.Array,
    codes: jax.Array,
    scale: jax.Array,
    *,
    block_o: int = BLOCK_O,
    block_k: int = BLOCK_K,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """x [M, I] (float) times int8 codes [O, I] with per-channel scale [O] or [O, 1].

    Args:
      block_o, block_k: upper bounds on the output tile and the I chunk; each is lowered to the
        largest power of two that divides O (resp. I / num_splits).
      num_splits: splits of I; default: enough for about TARGET_PROGRAMS programs.
      num_warps, num_stages: GPU launch parameters.
      interpret: run the Pallas interpreter; default: on CPU.

    Returns:
      [M, O] in x's dtype.
    """
    m, n_in = x.shape
    n_out = codes.shape[0]
    if codes.shape != (n_out, n_in) or codes.dtype != jnp.int8:
        raise ValueError(f"int8_matmul: codes must be int8 [O, I={n_in}], got {codes.dtype}"
                         f"{list(codes.shape)}")  # fmt: skip
    if scale.size != n_out:
        raise ValueError(f"int8_matmul: scale must have O={n_out} entries, got {scale.shape}")
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"int8_matmul: x has {m} rows; the kernel takes 1 to {MAX_ROWS}")
    bo = fit_block(n_out, block_o)
    if not bo:
        raise ValueError(f"int8_matmul: no block of {MIN_BLOCK}..{block_o} divides O={n_out}")
    if not fit_block(n_in, block_k):
        raise ValueError(f"int8_matmul: no block of {MIN_BLOCK}..{block_k} divides I={n_in}")
    if num_splits is None:
        num_splits = default_splits(n_out // bo, n_in // fit_block(n_in, block_k))
    split_len = n_in // num_splits
    bk = fit_block(split_len, block_k) if n_in % num_splits == 0 else 0
    if not bk:
        raise ValueError(f"int8_matmul: num_splits={num_splits} does not cut I={n_in} into "
                         f"multiples of {MIN_BLOCK}")  # fmt: skip
    _, interpret = resolve_platform("gpu", interpret)
    rows = 1 if m == 1 else max(MIN_BLOCK, next_pow2(m))
    xp = x if rows == m else jnp.pad(x, ((0, rows - m), (0, 0)))
    out = _int8_matmul_call(
        xp, codes, scale.reshape(1, n_out), bo, bk, num_splits, num_warps, num_stages, interpret
    )
    if num_splits > 1:
        out = jnp.sum(out, axis=0)
    return out[:m].astype(x.dtype)


def _kernel(x_ref, q_ref, s_ref, o_ref, *, block_k: int, chunks: int):
    """x_ref [rows, split], q_ref [bo, split], s_ref [1, bo] -> o_ref [rows, bo]."""
    rows = x_ref.shape[0]
    bo = q_ref.shape[0]
    one_row = rows == 1

    def body(c, acc):
        k = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
        x = x_ref[:, k]  # [rows, bk]
        q = q_ref[:, k]  # [bo, bk] int8
        if one_row:
            return acc + q.astype(jnp.float32) * x.astype(jnp.float32)
        w = q.astype(x.dtype)
        dims = (((1,), (1,)), ((), ()))
        return acc + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    init = jnp.zeros((bo, block_k) if one_row else (rows, bo), jnp.float32)
    acc = lax.fori_loop(0, chunks, body, init)
    y = jnp.sum(acc, axis=1)[None, :] if one_row else acc
    o_ref[...] = (y * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _int8_matmul_call(x, codes, scale, bo, bk, splits, num_warps, num_stages, interpret):
    rows, n_in = x.shape
    n_out = codes.shape[0]
    split_len = n_in // splits
    kernel = functools.partial(_kernel, block_k=bk, chunks=split_len // bk)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, n_out), x.dtype)
        out_spec = pl.BlockSpec((rows, bo), lambda j, s: (0, j))
    else:  # float32 partials [splits, rows, O], summed by the caller
        out_shape = jax.ShapeDtypeStruct((splits, rows, n_out), jnp.float32)
        out_spec = pl.BlockSpec((None, rows, bo), lambda j, s: (s, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(cdiv(n_out, bo), splits),
        in_specs=[
            pl.BlockSpec((rows, split_len), lambda j, s: (0, s)),
            pl.BlockSpec((bo, split_len), lambda j, s: (j, s)),
            pl.BlockSpec((1, bo), lambda j, s: (0, j)),
        ],
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else gpu_compiler_params(num_warps, num_stages),
        name="int8_matmul",
    )(x, codes, scale)
