"""Statistics of every linear layer's inputs on calibration text (GPTQ's Hessians,
SmoothQuant's per-channel maxima): one eager pass of the float model per window, with each
`Linear` wrapped by a recorder that folds its inputs into a per-layer accumulator. A tied
embedding's head inputs (the final normed hidden states) are recorded under "embed"."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model import Embedding, Linear, Transformer

# fold(previous statistic or None, inputs [rows, I] float32) -> new statistic
Fold = Callable[[jax.Array | None, jax.Array], jax.Array]


class _InputRecorder(nnx.Module):
    """Stands in for a Linear during calibration: folds its inputs into `sink[name]`."""

    def __init__(self, inner: Linear, name: str, sink: dict, fold: Fold):
        self.inner, self.name, self.sink, self.fold = inner, name, sink, fold

    def __call__(self, x: jax.Array) -> jax.Array:
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        self.sink[self.name] = self.fold(self.sink.get(self.name), x2)
        return self.inner(x)


class _HeadInputRecorder(nnx.Module):
    """Stands in for a tied Embedding: lookups pass through, `attend` inputs are folded."""

    def __init__(self, inner: Embedding, sink: dict, fold: Fold):
        self.inner, self.sink, self.fold = inner, sink, fold

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.inner(ids)

    def attend(self, x: jax.Array) -> jax.Array:
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        self.sink["embed"] = self.fold(self.sink.get("embed"), x2)
        return self.inner.attend(x)


def record_linear_inputs(
    model: Transformer, windows: Sequence[Sequence[int]], fold: Fold
) -> dict[str, jax.Array]:
    """{layer name: statistic} over the windows; the model is left as it was. A float tied
    embedding adds "embed": the statistic of its head's inputs."""
    from jaxllm.quant.apply import linear_slots

    sink: dict[str, jax.Array] = {}
    slots = [(n, p, a) for n, p, a in linear_slots(model) if isinstance(getattr(p, a), Linear)]
    for name, parent, attr in slots:
        setattr(parent, attr, _InputRecorder(getattr(parent, attr), name, sink, fold))
    tied_head = model.lm_head is None and isinstance(model.embed, Embedding)
    if tied_head:
        model.embed = _HeadInputRecorder(model.embed, sink, fold)
    try:
        for ids in windows:
            t = len(ids)
            mask = jnp.tril(jnp.ones((t, t), bool))[None]
            model(jnp.asarray([ids], jnp.int32), jnp.arange(t)[None], mask)
    finally:
        for _, parent, attr in slots:
            setattr(parent, attr, getattr(parent, attr).inner)
        if tied_head:
            model.embed = model.embed.inner
    return sink
