"""GPTQ (Frantar et al., 2022) for the linear layers, calibrated on offline text.

For a layer y = x @ W^T, GPTQ quantizes W [O, I] one input column at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse of the
Hessian H = sum x^T x [I, I] of the layer's inputs on calibration text: it minimises
||X (W - Q)^T||, the output error, rather than ||W - Q||.

Each group's absmax scale is taken when the sweep reaches the group (from the weights as
compensated so far), and the result is an ordinary `QuantizedWeight`. The sweep is one
`fori_loop` over the columns, jit-compiled once per weight shape. Hessians come from one
eager pass of the float model over the calibration windows (every linear layer's inputs
recorded on the way).
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
    quantize_asymmetric_with,
    quantize_with_scale,
    rtn_scale,
)

CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-3")


@functools.partial(jax.jit, static_argnames=("bits", "group", "percdamp", "symmetric"))
def _gptq_sweep(w, h, *, bits: int, group: int, percdamp: float, symmetric: bool):
    """Returns (error-compensated weights [O, I], scales [O, N], offsets [O, N]):
    round-to-nearest of the weights under the scales (and offsets) is the result."""
    n_out, n_in = w.shape
    diag = jnp.diag(h)
    dead = diag == 0  # inputs never active in calibration: weight 0, Hessian 1
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[None], 0.0, w.astype(jnp.float32))
    h = h + percdamp * jnp.mean(diag) * jnp.eye(n_in)
    # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j holds column j's error weights.
    hinv = jnp.linalg.inv(h)
    u = jnp.linalg.cholesky((hinv + hinv.T) / 2).T
    qmin, qmax = (-127.0, 127.0) if bits == 8 else (-8.0, 7.0)
    scale_dtype = jnp.float32 if bits == 8 else INT4_SCALE_DTYPE
    cols = jnp.arange(n_in)

    def body(j, carry):
        w, scale, offset = carry
        gi = j // group
        # A group's scale is set when the sweep enters it, from the weights as compensated so
        # far (GPTQ's order), and rounded to the stored dtype before it is used.
        block = jax.lax.dynamic_slice(w, (0, gi * group), (n_out, group))
        if symmetric:
            fresh_s = rtn_scale(block, bits, group, scale_dtype)[:, 0]
            fresh_o = jnp.zeros((n_out,), jnp.float32)
        else:
            fresh_s, fresh_o = (a[:, 0] for a in asymmetric_params(block, group))
        first = j % group == 0
        s = jnp.where(first, fresh_s.astype(jnp.float32), scale[:, gi])
        o = jnp.where(first, fresh_o.astype(jnp.float32), offset[:, gi])
        scale, offset = scale.at[:, gi].set(s), offset.at[:, gi].set(o)
        col = w[:, j]
        if symmetric:
            dq = jnp.clip(jnp.round(col / s), qmin, qmax) * s
        else:
            dq = jnp.clip(jnp.round((col - o) / s), 0.0, 15.0) * s + o
        err = (col - dq) / u[j, j]
        # Columns after j absorb the error; column j itself becomes exactly dq.
        update = jnp.outer(err, jnp.where(cols > j, u[j], 0.0))
        return (w - update).at[:, j].set(dq), scale, offset

    scale = jnp.ones((n_out, n_in // group), jnp.float32)
    offset = jnp.zeros((n_out, n_in // group), jnp.float32)
    w, scale, offset = jax.lax.fori_loop(0, n_in, body, (w, scale, offset))
    return w, scale.astype(scale_dtype), offset.astype(scale_dtype)


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    bits: int,
    group: int | None,
    percdamp: float = 0.01,
    symmetric: bool = True,
) -> QuantizedWeight:
    """GPTQ of w [O, I] for inputs with Hessian h [I, I]; same layout as `quantize`."""
    g = check_groups(w.shape, group)
    wc, scale, offset = _gptq_sweep(
        jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
        bits=bits, group=g, percdamp=percdamp, symmetric=symmetric,
    )  # fmt: skip
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
    model: Transformer, windows: Sequence[Sequence[int]], log=print
) -> Callable[..., QuantizedWeight]:
    """A `Quantizer` for `quantize_model` that runs GPTQ with Hessians from `windows`."""
    log(f"[jaxllm] GPTQ: collecting Hessians over {len(windows)} calibration windows")
    hessians = collect_hessians(model, windows)

    def quantizer(
        name: str, w: jax.Array, bits: int, group: int | None, symmetric: bool = True
    ) -> QuantizedWeight:
        check_groups(w.shape, group, name)
        return gptq_quantize(w, hessians[name], bits, group, symmetric=symmetric)

    return quantizer


def output_error(w: np.ndarray, qw: QuantizedWeight, x: np.ndarray) -> float:
    """||x (W - dq(Q))^T||^2: what GPTQ minimises (for tests and reports)."""
    from jaxllm.quant.qtensor import dequantize

    d = np.asarray(w, np.float32) - np.asarray(dequantize(qw))
    return float(np.sum((np.asarray(x, np.float32) @ d.T) ** 2))
