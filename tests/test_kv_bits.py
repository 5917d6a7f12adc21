"""bfloat16 pages held as uint16 bits (`jaxllm.quant.kv_bits`) against the same pages held as
plain bfloat16: the same writes, reads, copies and engine tokens, bit for bit; and a page write
that, like a float16 one, needs no pool-sized buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine import EngineConfig, LLMEngine
from jaxllm.engine.model_runner import copy_pages_impl
from jaxllm.model import Transformer, init_pages, random_params
from jaxllm.quant.kv import gather_pages, read_kv, scatter_slots
from jaxllm.quant.kv_bits import Bfloat16Bits, page_storage, to_bits
from jaxllm.sampling import SamplingParams


def _bits(x) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16))


def test_writes_reads_and_copies_equal_plain_bfloat16_pages():
    rng = np.random.default_rng(0)
    plain = jnp.asarray(rng.normal(size=(2, 6, 4, 16)), jnp.bfloat16)  # [K, pages, page, D]
    held = Bfloat16Bits(to_bits(plain))
    new = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    slots = jnp.asarray([3, 17, 24, 99, 0], jnp.int32)  # 99: out of range, dropped
    want = scatter_slots(plain, new, slots)
    got = scatter_slots(held, new, slots)
    assert isinstance(got, Bfloat16Bits) and got.bits.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(got.bits), _bits(want))
    np.testing.assert_array_equal(_bits(read_kv(got)), _bits(want))
    tables = jnp.asarray([[5, 0, 2], [1, 1, 4]], jnp.int32)
    np.testing.assert_array_equal(gather_pages(got, tables), gather_pages(want, tables))
    src, dst = jnp.asarray([0, 4], jnp.int32), jnp.asarray([3, 1], jnp.int32)
    copied = copy_pages_impl((got,), src, dst)[0]
    np.testing.assert_array_equal(np.asarray(copied.bits), _bits(want.at[:, dst].set(want[:, src])))


def test_page_write_needs_no_pool_sized_buffer_like_float16():
    """XLA:CPU widens a bfloat16 scatter's whole operand to float32; the uint16 pool is
    written in place, as a float16 pool is (compared by the compiled write's scratch bytes)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the widening is XLA:CPU's")
    shape = (3, 256, 16, 64)  # [K, pages, page, D]
    new = jax.ShapeDtypeStruct((3, 8, 64), jnp.float32)
    slots = jax.ShapeDtypeStruct((8,), jnp.int32)

    def scratch(pool):
        write = jax.jit(scatter_slots, donate_argnums=(0,))
        return write.lower(pool, new, slots).compile().memory_analysis().temp_size_in_bytes

    pool_bytes = int(np.prod(shape)) * 2
    f16 = scratch(jax.ShapeDtypeStruct(shape, jnp.float16))
    held = scratch(Bfloat16Bits(jax.ShapeDtypeStruct(shape, jnp.uint16)))
    assert f16 < pool_bytes // 16  # the oracle writes in place
    assert held <= f16


def test_native_kernel_reads_held_pages_as_bfloat16():
    from jaxllm import cpu_kernels
    from pallas_kernels.reference import ragged_paged_attention_reference
    from tests.test_kernels import max_err, ragged_inputs

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the native kernel is not built")
    kv_lens, q_lens = [1, 37, 50, 20, 300], [1, 5, 50, 1, 300]
    q, kp, vp, lens, tables, cu = ragged_inputs(9, 3, 64, 16, kv_lens, q_lens, jnp.float32, pad=0)
    kp, vp = kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16)
    plain = cpu_kernels.paged_attention(q, kp, vp, lens, tables, cu, 5, sm_scale=0.125)
    held = cpu_kernels.paged_attention(
        q, Bfloat16Bits(to_bits(kp)), Bfloat16Bits(to_bits(vp)), lens, tables, cu, 5,
        sm_scale=0.125,
    )  # fmt: skip
    want = ragged_paged_attention_reference(
        q, kp.astype(jnp.float32), vp.astype(jnp.float32), lens, tables, cu, 5, sm_scale=0.125
    )
    np.testing.assert_array_equal(held, plain)
    assert max_err(held, want) <= 2e-5


@pytest.mark.parametrize(
    "attention", ["xla", pytest.param("flash", marks=pytest.mark.slow)]
)  # xla: the native CPU kernel (or the jnp split); flash: the ragged kernel, interpreted
def test_engine_on_held_pages_equals_engine_on_plain_bfloat16_pages(tiny_config, attention):
    """Greedy and seeded n=3 requests (forks: copy-on-write page copies) with a shared prefix
    (prefix-cached pages): the same tokens with the pool held either way."""
    params = random_params(tiny_config, seed=5, scale=0.3)
    model = Transformer(tiny_config, params, attention=attention)
    config = EngineConfig(num_pages=48, page_size=8, kv_cache_dtype="bfloat16")
    rng = np.random.default_rng(1)
    shared = [int(t) for t in rng.integers(3, 250, 12)]
    prompts = [shared + [7, 8], shared + [9], [int(t) for t in rng.integers(3, 250, 5)]]
    sp = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=5, seed=3, n=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
    ]
    outputs = []
    for hold in (True, False):
        engine = LLMEngine(model, config)
        if hold:
            assert isinstance(engine.runner.pages[0][0], Bfloat16Bits) == (
                jax.default_backend() == "cpu"
            )
        else:
            engine.runner.pages = init_pages(tiny_config, 48, 8, jnp.bfloat16)
        outputs.append([[c.token_ids for c in r.completions] for r in engine.run(prompts, sp)])
    assert outputs[0] == outputs[1]
    assert page_storage((jnp.zeros(3, jnp.float16),))[0].dtype == jnp.float16  # only bf16 held
