"""The Pallas weight-only int8 matmul (interpret mode) against its jnp reference and against a
float matmul of the dequantized weight; `qlinear`'s dispatch to it; a quantized model decoding
through it against the XLA path.

Tolerances: float32 1e-5 relative to the largest output (summation order only); bfloat16 one
bf16 rounding of the output (2^-8 relative) on top of float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError
from jaxllm.config import ModelConfig
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.quant import quantize_model
from jaxllm.quant.int8_kernel import int8_kernel_mode, set_int8_kernel_mode, uses_int8_kernel
from jaxllm.quant.matmul import qlinear
from jaxllm.quant.qtensor import dequantize, quantize
from jaxllm.sampling import SamplingParams
from pallas_kernels.quant_matmul import (
    GemvConfig,
    fit_block,
    int8_matmul,
    int8_matmul_reference,
    widen_int8,
)

REL_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7}


def case(m, o, i, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (m, i), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (o, i), jnp.float32) * 0.05
    return x, quantize(w, 8)


def fused_case(m, dtype, fusion, seed, key_seed):
    """x [m, I], an int8 weight and `int8_matmul`'s inputs for `fusion` (None, "norm",
    "swiglu": [gate; up] rows after a norm, "residual")."""
    o, i = (128, 256) if fusion == "swiglu" else (64, 256)
    x, qw = case(m, o, i, dtype, seed=seed)
    key = jax.random.PRNGKey(key_seed)
    args = {}
    if fusion in ("norm", "swiglu"):
        norm_w = (1.0 + 0.1 * jax.random.normal(key, (i,))).astype(dtype)
        args.update(norm_weight=norm_w, norm_eps=1e-5)
    if fusion == "swiglu":
        args.update(swiglu=True)
    if fusion == "residual":
        args.update(residual=jax.random.normal(key, (m, o)).astype(dtype))
    return x, qw, args


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize(
    "m,o,i,dtype,kw",
    [
        (1, 64, 256, jnp.float32, {}),
        (1, 96, 576, jnp.bfloat16, {}),  # I = 64 * 9: the chunk shrinks to 64
        (1, 48, 128, jnp.float32, dict(num_splits=4, block_k=16)),
        (1, 40, 256, jnp.float32, {}),  # one row: output tiles of 8
        (1, 64, 512, jnp.bfloat16, dict(block_o=4, num_splits=1, chunk_reduce=True)),
        (1, 96, 1024, jnp.float32, dict(block_o=16, num_splits=2, chunk_reduce=True)),
        (3, 32, 128, jnp.bfloat16, {}),  # rows padded to 16 for the dot
        (5, 128, 64, jnp.float32, dict(block_o=16, num_splits=2, block_k=16)),
        (16, 64, 256, jnp.bfloat16, dict(num_splits=2)),
        # prefetch: I in one chunk (codes loaded up front), then in four
        (1, 64, 512, jnp.bfloat16, dict(block_o=8, block_k=512, num_splits=1, prefetch=True)),
        (1, 64, 512, jnp.float32, dict(block_k=128, num_splits=1, prefetch=True)),
        (3, 32, 128, jnp.float32, dict(block_k=128, num_splits=1, prefetch=True)),
    ],
)
def test_int8_matmul_matches_reference_and_dequantized_float(m, o, i, dtype, kw):
    x, qw = case(m, o, i, dtype)
    got = int8_matmul(x, qw.values, qw.scale, interpret=True, **kw)
    assert got.shape == (m, o) and got.dtype == x.dtype
    assert rel_err(got, int8_matmul_reference(x, qw.values, qw.scale)) <= REL_TOL[dtype]
    dequantized = jnp.dot(x.astype(jnp.float32), dequantize(qw).T)
    assert rel_err(got, dequantized) <= REL_TOL[dtype]


@pytest.mark.parametrize(
    "m,dtype,fusion,kw",
    [
        (1, jnp.float32, "norm", {}),
        (1, jnp.bfloat16, "norm", dict(block_o=4, block_k=64)),
        (3, jnp.bfloat16, "norm", {}),
        (1, jnp.float32, "swiglu", {}),
        (1, jnp.bfloat16, "swiglu", dict(block_o=8, block_k=128, chunk_reduce=False)),
        (1, jnp.float32, "swiglu", dict(block_o=2, chunk_reduce=True)),  # 4 rows a program
        (5, jnp.float32, "swiglu", {}),
        (1, jnp.bfloat16, "residual", {}),
        (4, jnp.float32, "residual", dict(num_splits=4)),  # fused work forces one split
        (1, jnp.bfloat16, "norm", dict(block_o=4, block_k=256, prefetch=True)),
        (1, jnp.float32, "norm", dict(block_o=4, block_k=64, prefetch=True)),
        (1, jnp.bfloat16, "swiglu", dict(block_o=2, block_k=256, chunk_reduce=True, prefetch=True)),
        (1, jnp.bfloat16, "residual", dict(block_o=4, block_k=256, prefetch=True)),
        (2, jnp.float32, "residual", dict(block_k=64, prefetch=True)),
        (1, jnp.float32, "residual", dict(block_o=16, block_k=256, prefetch=True)),
        # late_norm: the RMS from the same pass as the products, applied to the sums
        (1, jnp.bfloat16, "norm", dict(block_o=4, block_k=256, late_norm=True)),
        (1, jnp.float32, "norm", dict(block_o=8, block_k=64, late_norm=True)),
        (3, jnp.bfloat16, "norm", dict(block_k=128, late_norm=True)),
        (1, jnp.bfloat16, "swiglu", dict(block_o=4, block_k=256, late_norm=True, prefetch=True)),
        (1, jnp.bfloat16, "swiglu", dict(block_o=16, block_k=64, late_norm=True)),
        (1, jnp.bfloat16, "residual", dict(block_o=4, late_norm=True)),  # no norm: ignored
    ],
)
def test_fused_int8_matmul_matches_the_unfused_ops(m, dtype, fusion, kw):
    """The norm prologue, SwiGLU and residual epilogues against the model's ops run one at a
    time (`int8_matmul_reference`) and against the unfused kernel followed by those ops."""
    x, qw, args = fused_case(m, dtype, fusion, seed=3, key_seed=7)
    o = qw.values.shape[0]
    got = int8_matmul(x, qw.values, qw.scale, interpret=True, **args, **kw)
    want = int8_matmul_reference(x, qw.values, qw.scale, **args)
    width = o // 2 if fusion == "swiglu" else o
    assert got.shape == (m, width) and got.dtype == x.dtype
    assert rel_err(got, want) <= 2 * REL_TOL[dtype]  # rounding of the fused input, then output
    # Unfused: the norm by hand, the kernel, then the epilogue by hand.
    xin = x
    if "norm_weight" in args:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
        xin = args["norm_weight"] * x32.astype(dtype)
    y = int8_matmul(xin, qw.values, qw.scale, interpret=True)
    if fusion == "swiglu":
        y = jax.nn.silu(y[:, :width]) * y[:, width:]
    if fusion == "residual":
        y = args["residual"] + y
    assert rel_err(got, y) <= 2 * REL_TOL[dtype]


def test_widen_int8_is_exact_for_every_code():
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(widen_int8(q)), np.asarray(q, np.float32))


@pytest.mark.parametrize(
    "fusion,kw",
    [
        (None, dict(block_o=4, block_k=128, num_splits=1, chunk_reduce=True)),
        (None, dict(block_o=8, block_k=64, num_splits=2)),  # kept partial products, splits
        ("norm", dict(block_o=4, block_k=256, prefetch=True)),
        ("norm", dict(block_o=4, block_k=64, late_norm=True)),
        ("swiglu", dict(block_o=2, block_k=256, chunk_reduce=True)),
        ("residual", dict(block_o=4, block_k=64, chunk_reduce=True)),
    ],
)
def test_bit_convert_gives_the_conversion_launchs_exact_output(fusion, kw):
    """`bit_convert` widens the codes by bit operations: the same float32 values in the same
    summation order, so the output equals the conversion launch's bit for bit (and so is as
    close to the reference as that one). That the kernel takes the option at all is checked
    on its lowered form below."""
    x, qw, args = fused_case(1, jnp.bfloat16, fusion, seed=5, key_seed=11)
    plain = int8_matmul(x, qw.values, qw.scale, interpret=True, **args, **kw)
    got = int8_matmul(x, qw.values, qw.scale, interpret=True, bit_convert=True, **args, **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(plain, np.float32))
    want = int8_matmul_reference(x, qw.values, qw.scale, **args)
    assert rel_err(got, want) <= 2 * REL_TOL[jnp.bfloat16]


@pytest.mark.parametrize("rows", [1, 3])
def test_launch_options_reach_the_kernel_lowered_for_cuda(rows):
    """Lowered for CUDA on this machine (the Triton IR the GPU would compile): the plain
    launch widens the int8 codes with `sitofp`; `bit_convert` (one row) leaves no int8
    conversion; `evict_first` puts the evict-first policy on the code loads and on no other
    load. The interpreter ignores both options, so this is where they are checked."""
    from pallas_kernels.common import triton_ir

    args = (
        jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((64, 256), jnp.int8),
        jax.ShapeDtypeStruct((64,), jnp.float32),
    )

    def ir(**kw):
        def f(x, codes, scale):
            return int8_matmul(x, codes, scale, interpret=False, block_k=128, num_splits=1, **kw)

        try:
            (text,) = triton_ir(f, *args)
        except ImportError as e:  # pragma: no cover - a jax that moved its Triton lowering
            pytest.skip(f"no Triton lowering to hook in this jax: {e}")
        return text

    def int8_widening(text):
        return [ln for ln in text.splitlines() if "sitofp" in ln and "xi8>" in ln]

    def loads(text):
        return [ln for ln in text.splitlines() if "tt.load" in ln]

    plain, bits, evict = ir(), ir(bit_convert=True), ir(evict_first=True)
    assert int8_widening(plain) and not any("evict_first" in ln for ln in loads(plain))
    if rows == 1:
        assert not int8_widening(bits) and "bitcast" in bits
    else:  # the dot path widens to bf16 for the tensor cores: the option is a one-row one
        assert bits == plain
    evicting = [ln for ln in loads(evict) if "evict_first" in ln]
    assert evicting and all("!tt.ptr<i8>" in ln for ln in evicting)
    assert len(loads(evict)) == len(loads(plain))


def test_fused_int8_matmul_rejects_bad_fused_inputs():
    x, qw = case(2, 64, 128, jnp.float32)
    with pytest.raises(ValueError, match="norm_weight must have I=128"):
        int8_matmul(x, qw.values, qw.scale, norm_weight=jnp.ones(64), interpret=True)
    with pytest.raises(ValueError, match=r"residual must be \[2, 32\]"):
        int8_matmul(x, qw.values, qw.scale, swiglu=True, residual=jnp.ones((2, 64)))
    x, qw = case(1, 34, 128, jnp.float32)
    with pytest.raises(ValueError, match="O=17 .half of 34 gate/up rows"):
        int8_matmul(x, qw.values, qw.scale, swiglu=True, interpret=True)


def test_int8_matmul_rejects_shapes_it_cannot_tile():
    x, qw = case(1, 42, 64, jnp.float32)  # one row: 42 has no power-of-two divisor >= 4
    with pytest.raises(ValueError, match="O=42"):
        int8_matmul(x, qw.values, qw.scale, interpret=True)
    x, qw = case(2, 40, 64, jnp.float32)  # several rows: 40 has none >= 16
    with pytest.raises(ValueError, match="O=40"):
        int8_matmul(x, qw.values, qw.scale, interpret=True)
    x, qw = case(17, 32, 64, jnp.float32)
    with pytest.raises(ValueError, match="17 rows"):
        int8_matmul(x, qw.values, qw.scale, interpret=True)
    assert fit_block(3072, 256) == 256 and fit_block(576, 256) == 64 and fit_block(40, 32) == 0


def test_qlinear_dispatch_and_mode_switch():
    x, qw = case(2, 64, 128, jnp.bfloat16)
    want = qlinear(x, qw)  # CPU default: dequantize, then XLA's dot
    with int8_kernel_mode("always"):
        assert uses_int8_kernel(x, qw)
        got = qlinear(x[None], qw)[0]  # leading batch axes are flattened into rows
    assert rel_err(got, want) <= REL_TOL[jnp.bfloat16]
    assert uses_int8_kernel(x, qw, backend="gpu") and not uses_int8_kernel(x, qw)
    assert not uses_int8_kernel(jnp.zeros((17, 128), jnp.bfloat16), qw, backend="gpu")
    assert not uses_int8_kernel(x, quantize(dequantize(qw), 8, 32), backend="gpu")
    assert not uses_int8_kernel(x, quantize(dequantize(qw), 4, 32), backend="gpu")
    with int8_kernel_mode("never"):
        assert not uses_int8_kernel(x, qw, backend="gpu")
    with pytest.raises(JaxLLMError, match="'sometimes'"):
        set_int8_kernel_mode("sometimes")


def test_int8_model_decodes_the_same_through_the_kernel():
    cfg = ModelConfig.from_yaml("tiny")
    params = random_params(cfg, scale=0.1)
    prompts = [list(range(3, 20))]
    sp = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    runs = {}
    for mode in ("never", "always"):
        with int8_kernel_mode(mode):  # the mode is read when the generator traces
            gen = Generator(quantize_model(Transformer(cfg, params), "int8"))
            runs[mode] = (gen.generate(prompts, sp)[0].token_ids, gen.logits(prompts[0]))
    assert runs["always"][0] == runs["never"][0]
    assert rel_err(runs["always"][1], runs["never"][1]) <= 1e-5


def test_a_shared_program_follows_the_kernel_mode_it_is_called_under():
    """Generators of one structure share their programs (generate.programs_for), yet a
    generator run under another kernel mode or fusion setting must trace anew: the lowered
    decode step holds the Pallas GEMV (fused or not) exactly when the mode says so."""
    from jaxllm.quant.int8_kernel import int8_fusion

    cfg = ModelConfig.from_yaml("tiny")
    net = quantize_model(Transformer(cfg, random_params(cfg, scale=0.1)), "int8")
    gen = Generator(net)
    tokens = jnp.asarray([[5]], jnp.int32)
    texts = {}
    for name, mode, fuse in (("never", "never", True), ("fused", "always", True),
                             ("unfused", "always", False), ("never2", "never", True)):  # fmt: skip
        with int8_kernel_mode(mode), int8_fusion(fuse):
            texts[name] = gen._forward.lower(gen.state, tokens).as_text(debug_info=True)
    assert "int8_matmul" not in texts["never"] and texts["never2"] == texts["never"]
    assert "int8_matmul" in texts["fused"] and "int8_matmul" in texts["unfused"]
    # Unfused, each norm is its own rsqrt in the program; fused, the kernels compute them.
    assert texts["unfused"].count("rsqrt") > texts["fused"].count("rsqrt")
    # Another launch table (benchmarks swap it) is traced anew too.
    from pallas_kernels import quant_matmul

    before = quant_matmul.default_config
    quant_matmul.default_config = lambda rows, o, i: GemvConfig(4, 16, 1, 4, 3, True)
    try:
        with int8_kernel_mode("always"):
            other = gen._forward.lower(gen.state, tokens).as_text(debug_info=True)
    finally:
        quant_matmul.default_config = before
    assert "int8_matmul" in other and other != texts["fused"]


def test_int8_engine_decodes_the_same_through_the_fused_kernel(monkeypatch):
    """The engine's paged steps with the Pallas GEMV and its fusions (steps of <= 8 tokens:
    chunked prefill) give the XLA path's greedy tokens; the traced steps did call the kernel
    with each fusion."""
    from jaxllm.engine import EngineConfig, LLMEngine
    from pallas_kernels import quant_matmul

    seen = set()
    real = quant_matmul.int8_matmul

    def recording(*args, **kwargs):
        for k in ("norm_weight", "residual"):
            if kwargs.get(k) is not None:
                seen.add(k)
        if kwargs.get("swiglu"):
            seen.add("swiglu")
        seen.add("call")
        return real(*args, **kwargs)

    monkeypatch.setattr(quant_matmul, "int8_matmul", recording)

    cfg = ModelConfig.from_yaml("tiny")
    params = random_params(cfg, seed=5, scale=0.3)
    prompts = [[int(t) for t in np.random.default_rng(1).integers(3, 250, n)] for n in (3, 10)]
    sp = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 4)]
    config = EngineConfig(num_pages=8, page_size=16, max_num_batched_tokens=8)
    runs = {}
    for mode in ("never", "always"):
        with int8_kernel_mode(mode):
            engine = LLMEngine(quantize_model(Transformer(cfg, params), "int8"), config)
            runs[mode] = [r.output for r in engine.run(prompts, sp)]
    assert runs["always"] == runs["never"]
    assert seen == {"call", "norm_weight", "swiglu", "residual"}
