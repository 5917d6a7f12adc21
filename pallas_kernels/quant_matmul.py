"""Weight-only int8 matmul for few rows (decode): y = x @ (scale * q)^T.

At batch 1 a linear layer is a GEMV whose time is the time to read its weight, so the codes
stream from memory once, as int8 (half of bf16's bytes), and are widened to float in registers;
products accumulate in float32.

Layouts: x [M, I] (M rows: the tokens of a decode step), codes int8 [O, I] (the model's
[out, in]), scale [O] or [O, 1] (one per output channel) -> y [M, O] in x's dtype.

Programs: one per (tile of `block_o` output channels, split of I). Each loops over its split
in `block_k` chunks. One row multiplies elementwise (no padding to a tensor-core tile) and
either reduces each chunk into a [block_o] accumulator or keeps [block_o, block_k] partial
products until the end; several rows are padded to 16 (the smallest dot) and use a dot.
`num_splits` > 1 gives a narrow O enough programs to keep every SM streaming; the splits'
partial sums are added outside the kernel (a second kernel, so one row prefers narrow output
tiles over splits where O allows: see `default_config`).
"""

from __future__ import annotations

import dataclasses
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
MIN_ROW_BLOCK = 4  # one row needs no dot: output tiles may be as narrow as this
TARGET_PROGRAMS = 264  # two per SM of an H100 (132 SMs)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """One launch of the kernel. `block_o`, `block_k`: upper bounds on the output tile and the
    I chunk (each lowered to the largest power of two dividing O, resp. I / num_splits);
    `num_splits`: splits of I (None: enough for about TARGET_PROGRAMS programs); `chunk_reduce`:
    one row reduces each chunk into a [block_o] accumulator instead of keeping
    [block_o, block_k] partial products until the end (fewer registers, so wider chunks);
    `prefetch`: every load that depends on nothing (the scales, the residual, and the codes
    and x when I is one chunk) is issued before any arithmetic, so a program waits for memory
    once instead of once per barrier: a sweep option (on an H100 it beat the default launch
    on no Llama-3.2-1B product: benchmarks/results/int8_probe_h100.md); `late_norm` (a
    product with the RMSNorm fused in): W (w * x) is summed with x's sum of squares in the
    same pass and scaled by 1/rms at the end, so no reduction stands between a program's
    start and its code loads; the normalised input is then not rounded to x's dtype, as the
    unfused norm rounds it. Also a sweep option: on an H100 it tied the default on qkv (5.31
    against 5.34 µs) and lost on gate/up (16.90 against 15.81 µs). `bit_convert`: one row
    widens each code to float32 by integer bit operations (`widen_int8`) instead of the
    int-to-float conversion instruction, which Hopper issues at a quarter of the integer
    rate (not yet measured on a GPU: a sweep option). `evict_first`: the codes are loaded
    with L2 evict-first priority. A decode token streams every weight through L2 once (1.2 GB
    of int8 codes for Llama-3.2-1B, 50 MB of L2 on an H100), which otherwise also evicts the
    scales, norm weights and KV cache that the next token reads again (not yet measured on a
    GPU; the interpreter ignores it)."""

    block_o: int = BLOCK_O
    block_k: int = BLOCK_K
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    chunk_reduce: bool = False
    prefetch: bool = False
    late_norm: bool = False
    bit_convert: bool = False
    evict_first: bool = False


# float32 2**23 + u for a byte u in the low mantissa bits: exact for every u in 0..255
MAGIC_BITS = 0x4B000000
MAGIC_OFFSET = float(2**23 + 128)  # 2**23, plus the 128 that flipping the sign bit adds


def widen_int8(q: jax.Array) -> jax.Array:
    """int8 codes -> the same values in float32, without an int-to-float instruction.

    The code's byte with its sign bit flipped is q + 128 in 0..255; placed in the low bits of
    the float32 2**23 (bits 0x4B000000) it reads as 2**23 + q + 128, and one subtraction
    leaves q exactly. On a GPU this is a byte extract, a logic op and an add, all full-rate
    integer or float instructions, where `astype(float32)` compiles to a conversion (I2F)
    that the CUDA guide's throughput table puts at 16 a clock per SM on Hopper: on an H100
    about one per byte at the HBM rate, so a one-row GEMV is bound by conversions as much as
    by memory (benchmarks/results/gemv_sass_sm90.md)."""
    u = (q.astype(jnp.int32) & 0xFF) ^ (MAGIC_BITS | 0x80)
    return lax.bitcast_convert_type(u, jnp.float32) - MAGIC_OFFSET


def fit_block(n: int, want: int, minimum: int = MIN_BLOCK) -> int:
    """The largest power of two <= `want` that divides n, or 0 when it is under `minimum`."""
    b = 1 << max(0, want.bit_length() - 1)
    while b >= minimum and n % b:
        b //= 2
    return b if b >= minimum else 0


def compiles_on_gpu() -> bool:
    """Whether this jax still has the Triton lowering the kernel is written for."""
    return gpu_compiler_params(4, 3) is not None


# One-row launches for Llama-3.2-1B's layers on an H100, keyed by codes [O, I]: fused qkv, o,
# fused gate/up, down, the tied head. Picked by the kernels' own GPU time in jax.profiler
# traces (benchmarks/int8_probe.py, results in benchmarks/results/int8_probe_h100.md): in two
# runs 4 outputs a program, 2048-wide chunks and 8 warps was fastest or tied on all four layer
# products (qkv 5.3 µs, o 4.1, gate/up 15.8-15.9, down 9.8). The head's launch is the earlier
# wall-clock pick (88 µs in decode traces, 2.98 TB/s).
TUNED_ONE_ROW = {
    (3072, 2048): GemvConfig(4, 2048, 1, 8, 3, True),
    (2048, 2048): GemvConfig(4, 2048, 1, 8, 3, True),
    (16384, 2048): GemvConfig(4, 2048, 1, 8, 3, True),
    (2048, 8192): GemvConfig(4, 2048, 1, 8, 3, True),
    (128256, 2048): GemvConfig(4, 2048, 1, 4, 3, True),
}


def default_config(rows: int, n_out: int, n_in: int) -> GemvConfig:
    """The launch used when the caller gives none (rows M, codes [O, I]).

    One row: a measured launch for a known shape, else narrow tiles (4 outputs) streaming
    2048-wide chunks with 8 warps, one program per tile and no split: on an H100 these beat
    wide tiles with split partial sums (an extra kernel) and a one-row dot (the row broadcast
    to 16) on every layer swept. Several rows: the dot path's 32 x 256 tiles."""
    if rows != 1:
        return GemvConfig()
    tuned = TUNED_ONE_ROW.get((n_out, n_in))
    if tuned is not None:
        return tuned
    return GemvConfig(4, 2048, 1, 8, 3, True)


def supports(rows: int, n_out: int, n_in: int) -> bool:
    """Whether `int8_matmul` takes these shapes (rows M, codes [O, I]) with its default launch."""
    cfg = default_config(rows, n_out, n_in)
    min_o = MIN_ROW_BLOCK if rows == 1 else MIN_BLOCK
    return (
        0 < rows <= MAX_ROWS
        and fit_block(n_out, max(cfg.block_o, min_o), min_o) > 0
        and fit_block(n_in, cfg.block_k) > 0
    )


def default_splits(n_out_tiles: int, n_chunks: int) -> int:
    """The fewest power-of-two splits of I that give about TARGET_PROGRAMS programs."""
    splits = 1
    while n_out_tiles * splits < TARGET_PROGRAMS and n_chunks % (2 * splits) == 0:
        splits *= 2
    return splits


@dataclasses.dataclass(frozen=True)
class Fusion:
    """Work done inside the GEMV's launch instead of in kernels of its own (each a launch and
    a round trip of the activations through memory, which at batch 1 costs about as long as
    a small GEMV).

    `norm_eps`: x is RMS-normalised per row first (the norm weight is an input), rounded to
    x's dtype as the model's `RMSNorm` rounds. `swiglu`: codes [2H, I] hold the gate rows then
    the up rows and the result is silu(gate) * up, [M, H]. `residual`: a [M, O] input is
    added to the result."""

    norm_eps: float | None = None
    swiglu: bool = False
    residual: bool = False


def int8_matmul_reference(
    x: jax.Array,
    codes: jax.Array,
    scale: jax.Array,
    *,
    norm_weight: jax.Array | None = None,
    norm_eps: float = 1e-6,
    swiglu: bool = False,
    residual: jax.Array | None = None,
) -> jax.Array:
    """The oracle: x [M, I] @ (scale [O] * codes [O, I])^T in float32 -> [M, O] in x's dtype,
    with the optional fused work done as the model's own layers do it, one op at a time."""
    dt = x.dtype
    if norm_weight is not None:
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + norm_eps)
        x = norm_weight.astype(dt) * x32.astype(dt)
    acc = jnp.dot(x.astype(jnp.float32), codes.astype(jnp.float32).T)
    y = (acc * scale.reshape(1, -1).astype(jnp.float32)).astype(dt)
    if swiglu:
        h = y.shape[-1] // 2
        y = jax.nn.silu(y[:, :h]) * y[:, h:]
    if residual is not None:
        y = residual.astype(dt) + y
    return y


def int8_matmul(
    x: jax.Array,
    codes: jax.Array,
    scale: jax.Array,
    *,
    norm_weight: jax.Array | None = None,
    norm_eps: float = 1e-6,
    swiglu: bool = False,
    residual: jax.Array | None = None,
    config: GemvConfig | None = None,
    interpret: bool | None = None,
    **overrides,
) -> jax.Array:
    """x [M, I] (float) times int8 codes [O, I] with per-channel scale [O] or [O, 1].

    Args:
      norm_weight: [I]: RMS-normalise x (epsilon `norm_eps`) and scale by this first.
      swiglu: codes are [gate; up] rows, [2H, I]: return silu(gate) * up, [M, H].
      residual: [M, O] (or [M, H]) added to the result.
      config: the launch (default: `default_config` for these shapes).
      interpret: run the Pallas interpreter; default: on CPU.
      overrides: fields of GemvConfig replacing the config's (block_o=16, num_splits=2, ...).

    Returns:
      [M, O] (swiglu: [M, O / 2]) in x's dtype.
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
    if norm_weight is not None and norm_weight.size != n_in:
        raise ValueError(f"int8_matmul: norm_weight must have I={n_in} entries, "
                         f"got {norm_weight.shape}")  # fmt: skip
    if swiglu and n_out % 2:
        raise ValueError(f"int8_matmul: swiglu needs an even number of rows, got O={n_out}")
    width = n_out // 2 if swiglu else n_out
    if residual is not None and residual.shape != (m, width):
        raise ValueError(f"int8_matmul: residual must be [{m}, {width}], got {residual.shape}")
    fused = norm_weight is not None or swiglu or residual is not None
    cfg = dataclasses.replace(config or default_config(m, n_out, n_in), **overrides)
    if fused:  # the epilogue needs whole sums in one program
        cfg = dataclasses.replace(cfg, num_splits=1)
    # SwiGLU reads two rows per output (gate and up): one row may take 2 outputs per program.
    min_o = (MIN_ROW_BLOCK // 2 if swiglu else MIN_ROW_BLOCK) if m == 1 else MIN_BLOCK
    # a launch tuned for a SwiGLU product (2 outputs = 4 rows a program) may serve a plain one
    bo = fit_block(width, max(cfg.block_o, min_o), min_o)
    if not bo:
        half = f" (half of {n_out} gate/up rows)" if swiglu else ""
        raise ValueError(f"int8_matmul: no block of {min_o}..{cfg.block_o} divides O={width}{half}")
    if not fit_block(n_in, cfg.block_k):
        raise ValueError(f"int8_matmul: no block of {MIN_BLOCK}..{cfg.block_k} divides I={n_in}")
    num_splits = cfg.num_splits
    if num_splits is None:
        num_splits = default_splits(n_out // bo, n_in // fit_block(n_in, cfg.block_k))
    split_len = n_in // num_splits
    bk = fit_block(split_len, cfg.block_k) if n_in % num_splits == 0 else 0
    if not bk:
        raise ValueError(f"int8_matmul: num_splits={num_splits} does not cut I={n_in} into "
                         f"multiples of {MIN_BLOCK}")  # fmt: skip
    _, interpret = resolve_platform("gpu", interpret)
    rows = 1 if m == 1 else max(MIN_BLOCK, next_pow2(m))

    def pad(a):
        return a if rows == m else jnp.pad(a, ((0, rows - m), (0, 0)))

    fusion = Fusion(
        norm_eps=float(norm_eps) if norm_weight is not None else None,
        swiglu=swiglu,
        residual=residual is not None,
    )
    extra = []
    if norm_weight is not None:
        extra.append(norm_weight.reshape(1, n_in))
    if residual is not None:
        extra.append(pad(residual.astype(x.dtype)))
    # the launch as run: blocks and splits resolved, options off where they do not apply
    # (late_norm without a norm, bit_convert for the dot path, evict_first interpreted)
    launch = dataclasses.replace(
        cfg,
        block_o=bo,
        block_k=bk,
        num_splits=num_splits,
        late_norm=cfg.late_norm and norm_weight is not None,
        bit_convert=cfg.bit_convert and m == 1,
        evict_first=cfg.evict_first and not interpret,
    )
    out = _int8_matmul_call(
        pad(x), codes, scale.reshape(1, n_out), tuple(extra), launch, fusion, interpret
    )
    if num_splits > 1:
        out = jnp.sum(out, axis=0)
    return out[:m].astype(x.dtype)


def _kernel(*refs, launch: GemvConfig, chunks: int, fusion: Fusion):
    """x_ref [rows, split], (norm_ref [1, I]), q_ref [bo, split], s_ref [1, bo], (swiglu:
    the up rows' q and s), (res_ref [rows, bo]) -> o_ref [rows, bo]."""
    it = iter(refs)
    x_ref = next(it)
    norm_ref = next(it) if fusion.norm_eps is not None else None
    q_refs = [next(it)]
    s_refs = [next(it)]
    if fusion.swiglu:
        q_refs.append(next(it))
        s_refs.append(next(it))
    res_ref = next(it) if fusion.residual else None
    o_ref = next(it)
    rows = x_ref.shape[0]
    bo = q_refs[0].shape[0]
    one_row = rows == 1
    dt = x_ref.dtype
    f32 = jnp.float32
    block_k, chunk_reduce, prefetch = launch.block_k, launch.chunk_reduce, launch.prefetch
    late_norm, bit_convert = launch.late_norm, launch.bit_convert

    def read_codes(q_ref, cols):  # the codes are read once a token: first out of L2
        if launch.evict_first:  # imported here: the Triton backend is deprecated from jax 0.11
            from jax.experimental.pallas import triton as pltriton

            return pltriton.load(q_ref.at[:, cols], eviction_policy="evict_first")
        return q_ref[:, cols]

    # prefetch: at batch 1 a GEMV is a few µs long and each program runs once, so every wait
    # for memory is on the kernel's critical path; issue the independent loads up front.
    whole = chunks == 1 and prefetch
    q_whole = [read_codes(q_ref, slice(None)) for q_ref in q_refs] if whole else None
    scales = [s_ref[...] for s_ref in s_refs] if prefetch else None
    res = res_ref[...] if prefetch and res_ref is not None else None
    x_whole = x_ref[...] if whole or (norm_ref is not None and not late_norm) else None
    norm_whole = norm_ref[...] if whole and norm_ref is not None else None
    n_q = len(q_refs)

    if norm_ref is not None and not late_norm:  # the row's RMS, before any chunk
        xf = x_whole.astype(f32)
        inv_rms = lax.rsqrt(jnp.sum(xf * xf, axis=1, keepdims=True) / xf.shape[1]
                            + fusion.norm_eps)  # fmt: skip

    def products(x, nrm, load_codes, accs):
        if late_norm:  # the sum of squares beside the products; w * x in float32
            x32 = x.astype(f32)
            ssq = accs[n_q] + jnp.sum(x32 * x32, axis=1, keepdims=True)
            x = nrm.astype(f32) * x32
            x = x.astype(dt) if not one_row else x
        elif norm_ref is not None:  # rounded where RMSNorm rounds: after the RMS, the weight
            x = (x.astype(f32) * inv_rms).astype(dt)
            x = (nrm.astype(f32) * x.astype(f32)).astype(dt)
        out = []
        for q, acc in zip(load_codes(), accs[:n_q], strict=True):  # q [bo, bk] int8
            if one_row:
                prod = (widen_int8(q) if bit_convert else q.astype(f32)) * x.astype(f32)
                out.append(acc + (jnp.sum(prod, axis=1) if chunk_reduce else prod))
            else:
                dims = (((1,), (1,)), ((), ()))
                out.append(acc + lax.dot_general(x, q.astype(dt), dims, preferred_element_type=f32))
        if late_norm:
            out.append(ssq)
        return tuple(out)

    def body(c, accs):
        k = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
        x = x_ref[:, k]  # [rows, bk]
        nrm = norm_ref[:, k] if norm_ref is not None else None
        return products(x, nrm, lambda: [read_codes(q_ref, k) for q_ref in q_refs], accs)

    if one_row:
        init = jnp.zeros((bo,) if chunk_reduce else (bo, block_k), f32)
    else:
        init = jnp.zeros((rows, bo), f32)
    inits = tuple(init for _ in q_refs)
    if late_norm:
        inits += (jnp.zeros((rows, 1), f32),)
    if whole:
        accs = products(x_whole, norm_whole, lambda: q_whole, inits)
    else:
        accs = lax.fori_loop(0, chunks, body, inits)
    if late_norm:
        inv_rms = lax.rsqrt(accs[n_q] / x_ref.shape[1] + fusion.norm_eps)  # [rows, 1]
    ys = []
    for i, (acc, s_ref) in enumerate(zip(accs[:n_q], s_refs, strict=True)):
        if one_row:
            acc = (acc if chunk_reduce else jnp.sum(acc, axis=1))[None, :]
        y = acc * (scales[i] if prefetch else s_ref[...]).astype(f32)
        ys.append(y * inv_rms if late_norm else y)
    y = ys[0]
    if fusion.swiglu:  # each rounded to dt, as the unfused product's outputs are
        g = y.astype(dt).astype(f32)
        u = ys[1].astype(dt).astype(f32)
        y = (g / (1.0 + jnp.exp(-g))).astype(dt).astype(f32) * u
    if res_ref is not None:
        y = (res if prefetch else res_ref[...]).astype(f32) + y.astype(dt).astype(f32)
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _int8_matmul_call(x, codes, scale, extra, launch, fusion, interpret):
    bo, bk, splits = launch.block_o, launch.block_k, launch.num_splits
    rows, n_in = x.shape
    width = codes.shape[0] // 2 if fusion.swiglu else codes.shape[0]
    split_len = n_in // splits
    kernel = functools.partial(_kernel, launch=launch, chunks=split_len // bk, fusion=fusion)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, width), x.dtype)
        out_spec = pl.BlockSpec((rows, bo), lambda j, s: (0, j))
    else:  # float32 partials [splits, rows, O], summed by the caller
        out_shape = jax.ShapeDtypeStruct((splits, rows, width), jnp.float32)
        out_spec = pl.BlockSpec((None, rows, bo), lambda j, s: (s, 0, j))
    args = [x]
    specs = [pl.BlockSpec((rows, split_len), lambda j, s: (0, s))]
    extra = list(extra)
    if fusion.norm_eps is not None:
        args.append(extra.pop(0))
        specs.append(pl.BlockSpec((1, n_in), lambda j, s: (0, 0)))
    up = width // bo  # swiglu: the up rows' block offset
    for offset in (0, up) if fusion.swiglu else (0,):
        args += [codes, scale]
        specs += [
            pl.BlockSpec((bo, split_len), lambda j, s, o=offset: (j + o, s)),
            pl.BlockSpec((1, bo), lambda j, s, o=offset: (0, j + o)),
        ]
    if fusion.residual:
        args.append(extra.pop(0))
        specs.append(pl.BlockSpec((rows, bo), lambda j, s: (0, j)))
    return pl.pallas_call(
        kernel,
        grid=(cdiv(width, bo), splits),
        in_specs=specs,
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None
        if interpret
        else gpu_compiler_params(launch.num_warps, launch.num_stages),
        name="int8_matmul",
    )(*args)
