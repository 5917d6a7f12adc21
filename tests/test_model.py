"""Model structure against independent oracles: plain MHA, GQA conversion, RoPE, configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxLLMError
from jaxllm.config import ModelConfig
from jaxllm.gqa import mha_to_gqa
from jaxllm.model import Transformer, random_params, rope_inv_freq


def plain_mha_logits(cfg: ModelConfig, params: dict, ids: list[int]) -> np.ndarray:
    """A textbook numpy Llama with per-head attention and K/V repeated per query head."""
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t = len(ids)
    x = params["embed"][ids].astype(np.float64)
    inv = rope_inv_freq(cfg).astype(np.float64)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # [T, heads, D]
        a, b = v[..., : d // 2], v[..., d // 2 :]
        c, s = cos[:, None], sin[:, None]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    def norm(v, w):
        return w * v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps)

    causal = np.tril(np.ones((t, t), bool))
    for p in params["layers"]:
        y = norm(x, p["attn_norm"])
        q = rope((y @ p["wq"] + p.get("bq", 0)).reshape(t, h, d))
        kk = rope((y @ p["wk"] + p.get("bk", 0)).reshape(t, k, d))
        vv = (y @ p["wv"] + p.get("bv", 0)).reshape(t, k, d)
        heads = []
        for i in range(h):
            j = i // (h // k)  # the KV head this query head reads
            s = q[:, i] @ kk[:, j].T / np.sqrt(d)
            s = np.where(causal, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            heads.append(pr @ vv[:, j])
        x = x + np.concatenate(heads, -1) @ p["wo"]
        y = norm(x, p["mlp_norm"])
        g = y @ p["w_gate"]
        x = x + ((g / (1 + np.exp(-g))) * (y @ p["w_up"])) @ p["w_down"]
    x = norm(x, params["final_norm"])
    head = params["lm_head"] if "lm_head" in params else params["embed"].T
    return x @ head


def model_logits(cfg, params, ids, **kw):
    model = Transformer(cfg, params, **kw)
    t = len(ids)
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, _ = model(jnp.asarray([ids]), jnp.arange(t)[None], mask)
    return np.asarray(logits[0])


IDS = [3, 17, 250, 9, 9, 100, 42, 7, 1, 200, 31, 64]


@pytest.mark.parametrize(
    "heads,kv_heads,bias,tied",
    [(4, 4, False, False), (4, 2, False, True), (4, 1, True, False), (6, 3, True, True)],
    ids=["mha", "gqa", "mqa-bias", "gqa-bias-tied"],
)
def test_model_matches_plain_numpy_attention(tiny_config, heads, kv_heads, bias, tied):
    cfg = tiny_config.replace(
        num_heads=heads, num_kv_heads=kv_heads, attention_bias=bias, tie_word_embeddings=tied
    )
    params = random_params(cfg, seed=1, scale=0.1)
    want = plain_mha_logits(cfg, params, IDS)
    got = model_logits(cfg, params, IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_mha_to_gqa_one_head_per_group_is_identity(tiny_config):
    cfg = tiny_config.replace(num_kv_heads=tiny_config.num_heads)
    params = random_params(cfg, seed=2, scale=0.1)
    conv, cfg2 = mha_to_gqa(params, cfg, cfg.num_heads)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(conv)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("groups", [2, 1])
def test_mha_to_gqa_equals_mha_with_mean_pooled_heads(tiny_config, groups):
    """The GQA model computes what the MHA model computes once each head's K/V projection is
    replaced by its group's mean (MQA when groups == 1)."""
    cfg = tiny_config.replace(num_kv_heads=tiny_config.num_heads, attention_bias=True)
    params = random_params(cfg, seed=3, scale=0.1)
    conv, gcfg = mha_to_gqa(params, cfg, groups)
    assert gcfg.num_kv_heads == groups
    h, d = cfg.num_heads, cfg.head_dim
    pooled = []
    for p in params["layers"]:
        q = dict(p)
        for name in ("wk", "wv", "bk", "bv"):
            w = p[name].reshape(*p[name].shape[:-1], groups, h // groups, d)
            mean = w.mean(-2, keepdims=True)
            q[name] = np.broadcast_to(mean, w.shape).reshape(p[name].shape)
        pooled.append(q)
    want = plain_mha_logits(cfg, {**params, "layers": pooled}, IDS)
    got = model_logits(gcfg, conv, IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_mha_to_gqa_rejects_bad_groups(tiny_config):
    cfg = tiny_config.replace(num_kv_heads=tiny_config.num_heads)
    with pytest.raises(JaxLLMError, match="num_kv_heads=3 must be >= 1 and divide"):
        mha_to_gqa(random_params(cfg), cfg, 3)


def test_llama3_rope_scaling_matches_formula():
    cfg = ModelConfig.from_yaml("llama-3.1-8b")
    inv = rope_inv_freq(cfg)
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    wavelen = 2 * np.pi / plain
    # High frequencies untouched, low frequencies divided by the factor, a smooth band between.
    np.testing.assert_allclose(inv[wavelen < 8192 / 4], plain[wavelen < 8192 / 4], rtol=1e-6)
    np.testing.assert_allclose(inv[wavelen > 8192], plain[wavelen > 8192] / 8.0, rtol=1e-6)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert ((inv[mid] < plain[mid]) & (inv[mid] > plain[mid] / 8.0)).all()


def test_bfloat16_model_tracks_float32(tiny_config):
    params = random_params(tiny_config, seed=4, scale=0.1)
    f32 = model_logits(tiny_config, params, IDS)
    bf16 = model_logits(tiny_config, params, IDS, dtype=jnp.bfloat16)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - f32).max() <= 5e-2 * np.abs(f32).max()


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_weights_under_float32_model(tiny_config, tied):
    """weight_dtype=bfloat16: the matrices are held in bf16 (no float32 copy in the state the
    programs jit over); logits equal a float32 model on the same bf16-rounded weights up to
    rounding the matmul inputs, and beat the all-bfloat16 model's error."""
    from flax import nnx

    cfg = tiny_config.replace(tie_word_embeddings=tied) if tied else tiny_config
    params = random_params(cfg, seed=4, scale=0.1)
    if tied:
        params.pop("lm_head", None)
    rounded = jax.tree.map(
        lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)), params
    )
    for p_r, p in zip(rounded["layers"], params["layers"]):  # norms are not rounded
        p_r["attn_norm"], p_r["mlp_norm"] = p["attn_norm"], p["mlp_norm"]
    rounded["final_norm"] = params["final_norm"]
    model = Transformer(cfg, params, weight_dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    big = [a for a in leaves if a.ndim == 2]
    assert big and all(a.dtype == jnp.bfloat16 for a in big)
    got = model_logits(cfg, params, IDS, weight_dtype=jnp.bfloat16)
    want = model_logits(cfg, rounded, IDS)
    exact = plain_mha_logits(cfg, params, IDS)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    all_bf16 = model_logits(cfg, params, IDS, dtype=jnp.bfloat16)
    assert np.abs(got - exact).max() < np.abs(all_bf16 - exact).max()


@pytest.mark.parametrize(
    "name", ["tiny", "smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b"]
)
def test_shipped_configs_load(name):
    cfg = ModelConfig.from_yaml(name)
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert cfg.name == name


def test_bad_configs_raise(tiny_config):
    with pytest.raises(JaxLLMError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        tiny_config.replace(num_kv_heads=3)
    with pytest.raises(JaxLLMError, match="unsupported architecture 'gpt2'"):
        tiny_config.replace(architecture="gpt2")
    with pytest.raises(JaxLLMError, match="no model config 'nope'"):
        ModelConfig.from_yaml("nope")


def test_linear_rope_scaling_divides_positions():
    hf = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    cfg = ModelConfig.from_hf_config(hf)
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    np.testing.assert_allclose(rope_inv_freq(cfg), plain / 4.0, rtol=1e-6)
    hf["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(JaxLLMError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_hf_config(hf)


def test_sliding_window_caps_the_context():
    hf = {
        "model_type": "mistral",
        "vocab_size": 32,
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    }
    assert ModelConfig.from_hf_config(hf).max_position_embeddings == 4096
