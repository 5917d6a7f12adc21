"""Quantization-aware training: the recipe's weight quantizer in the forward pass with
straight-through gradients, and a short optax fine-tune that distils the float model.

`fake_quant(w)` returns dequantize(quantize(w)) forward and passes the gradient to w unchanged
(w + stop_gradient(dq - w)). `wrap_fake_quant` swaps every Linear (and the embedding, when the
recipe quantizes it) for a module that applies it to the float weight it still owns; training
updates those float weights; `unwrap` puts the plain modules back, ready for `quantize_model`.

The loss is KL(float teacher || fake-quantized student) per token on offline text: the student
learns to make its quantized self predict what the float model predicts, which is the gap a
recipe's perplexity measures (cross-entropy on the evaluation text's own domain would also
"narrow" it by fitting the text). Checkpoints are orbax (params, optimizer state, step);
a run pointed at an existing checkpoint directory resumes from its latest step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxllm.cpu_kernels import linear
from jaxllm.model import Embedding, Linear, Transformer
from jaxllm.quant.config import QuantConfig, load_recipe
from jaxllm.quant.qtensor import dequantize, quantize


def fake_quant(
    w: jax.Array, bits: int, group: int | None, symmetric: bool = True, **scales
) -> jax.Array:
    """Round-to-nearest quantize-dequantize of w [O, I], straight-through gradient.
    `scales`: scale_bits and scale_block (double-quantized int4 scales), as `quantize` takes."""
    q = quantize(jax.lax.stop_gradient(w), bits, group, symmetric=symmetric, **scales)
    dq = dequantize(q, w.dtype)
    return w + jax.lax.stop_gradient(dq - w)


class FakeQuantLinear(nnx.Module):
    def __init__(
        self, inner: Linear, bits: int, group: int | None, symmetric: bool = True, **scales
    ):
        self.inner, self.bits, self.group, self.symmetric = inner, bits, group, symmetric
        self.scale_bits, self.scale_block = scales.get("scale_bits"), scales.get("scale_block")

    def __call__(self, x: jax.Array) -> jax.Array:
        scales = dict(scale_bits=self.scale_bits, scale_block=self.scale_block)
        w = fake_quant(self.inner.weight[...], self.bits, self.group, self.symmetric, **scales)
        y = linear(x, w)
        return y + self.inner.bias[...] if self.inner.bias is not None else y


class FakeQuantEmbedding(nnx.Module):
    def __init__(
        self, inner: Embedding, bits: int, group: int | None, symmetric: bool = True, **scales
    ):
        self.inner, self.bits, self.group, self.symmetric = inner, bits, group, symmetric
        self.scale_bits, self.scale_block = scales.get("scale_bits"), scales.get("scale_block")

    def _table(self) -> jax.Array:
        scales = dict(scale_bits=self.scale_bits, scale_block=self.scale_block)
        return fake_quant(self.inner.table[...], self.bits, self.group, self.symmetric, **scales)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self._table(), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return linear(x, self._table()).astype(jnp.float32)


def wrap_fake_quant(model: Transformer, recipe: str | QuantConfig) -> Transformer:
    """Put the recipe's weight quantizers in the forward pass (in place)."""
    from jaxllm.quant.apply import linear_slots, scale_options

    cfg = load_recipe(recipe)
    if cfg.weight_bits is not None:
        scales = scale_options(cfg, cfg.weight_bits)
        for _, parent, attr in linear_slots(model):
            fake = FakeQuantLinear(
                getattr(parent, attr), cfg.weight_bits, cfg.group_size, cfg.symmetric, **scales
            )
            setattr(parent, attr, fake)
    if cfg.embed_bits is not None:
        group = cfg.group_size if cfg.embed_bits == 4 else None
        sym = cfg.symmetric or cfg.embed_bits == 8
        scales = scale_options(cfg, cfg.embed_bits)
        model.embed = FakeQuantEmbedding(model.embed, cfg.embed_bits, group, sym, **scales)
    return model


def unwrap(model: Transformer) -> Transformer:
    """Undo `wrap_fake_quant`: the plain modules, holding the trained float weights."""
    from jaxllm.quant.apply import linear_slots

    for _, parent, attr in linear_slots(model):
        mod = getattr(parent, attr)
        if isinstance(mod, FakeQuantLinear):
            setattr(parent, attr, mod.inner)
    if isinstance(model.embed, FakeQuantEmbedding):
        model.embed = model.embed.inner
    return model


def _forward(model: Transformer, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    positions = jnp.broadcast_to(jnp.arange(t)[None], tokens.shape)
    logits, _ = model(tokens, positions, mask)
    return logits


def teacher_log_probs(model: Transformer, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The float model's log-probabilities [T, V] on each window."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, tokens):
        return jax.nn.log_softmax(_forward(nnx.merge(graphdef, state), tokens)[0], axis=-1)

    return [np.asarray(f(state, jnp.asarray([w], jnp.int32))) for w in windows]


def kl_loss(model: Transformer, tokens: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean per-token KL(teacher || student); tokens [1, T], teacher [T, V] log-probs."""
    student = jax.nn.log_softmax(_forward(model, tokens)[0], axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))


@nnx.jit
def train_step(model, optimizer, tokens, teacher):
    loss, grads = nnx.value_and_grad(kl_loss)(model, tokens, teacher)
    optimizer.update(model, grads)
    return loss


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _latest(ckpt_dir: Path) -> tuple[int, Path] | None:
    steps = [int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*") if p.is_dir()]
    return (max(steps), ckpt_dir / f"step_{max(steps)}") if steps else None


def qat_finetune(
    model: Transformer,
    recipe: str | QuantConfig,
    windows: Sequence[Sequence[int]],
    *,
    steps: int,
    learning_rate: float = 1e-5,
    ckpt_dir: str | Path | None = None,
    save_every: int = 10,
    log=print,
) -> list[float]:
    """Fine-tune `model` (in place) against the recipe's quantizer; returns the step losses.

    Distils the model as it is on entry; with `ckpt_dir`, saves every `save_every` steps and
    resumes from the latest checkpoint there.
    """
    teacher = teacher_log_probs(model, windows)
    wrap_fake_quant(model, recipe)
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    start = 0
    ckpt = Path(ckpt_dir).absolute() if ckpt_dir is not None else None
    if ckpt is not None and (found := _latest(ckpt)) is not None:
        start, path = found
        target = {"model": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
        restored = _checkpointer().restore(path, jax.tree.map(np.asarray, target))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["opt"])
        log(f"[jaxllm] QAT: resumed from {path} at step {start}")
    losses = []
    for step in range(start, steps):
        i = step % len(windows)
        loss = train_step(model, optimizer, jnp.asarray([windows[i]], jnp.int32), teacher[i])
        losses.append(float(loss))
        log(f"[jaxllm] QAT step {step + 1}/{steps}: KL {float(loss):.5f}")
        if ckpt is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            tree = {"model": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
            cp = _checkpointer()
            cp.save(ckpt / f"step_{step + 1}", tree)
            cp.wait_until_finished()
    unwrap(model)
    return losses
