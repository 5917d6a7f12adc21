"""`jaxllm quantize --report`: bytes and quantization error of every matrix under a recipe."""

from __future__ import annotations

import numpy as np

from jaxllm.model import Embedding, Linear, Transformer
from jaxllm.quant.layers import QuantizedEmbedding, QuantizedLinear
from jaxllm.quant.qtensor import dequantize


def _matrices(model: Transformer) -> list[tuple[str, object]]:
    from jaxllm.quant.apply import linear_slots

    return [(n, getattr(p, a)) for n, p, a in linear_slots(model)] + [("embed", model.embed)]


def _float(m) -> np.ndarray:
    if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
        return np.asarray(dequantize(m.qweight))
    return np.asarray(m.weight[...] if isinstance(m, Linear) else m.table[...])


def layer_report(float_model: Transformer, quant_model: Transformer) -> list[dict]:
    """Per matrix: shape, format, bytes held and in bfloat16, and the error of the quantized
    weights against the float ones (relative Frobenius norm, max absolute)."""
    rows = []
    for (name, f), (_, q) in zip(_matrices(float_model), _matrices(quant_model)):
        assert isinstance(f, (Linear, Embedding))
        w, dq = _float(f), _float(q)
        if isinstance(q, (QuantizedLinear, QuantizedEmbedding)):
            qw = q.qweight
            kind = f"int{qw.bits} g{qw.group}" + (" asym" if qw.offset is not None else "")
            kind += " s8" if qw.scale_super is not None else ""  # double-quantized scales
            held = qw.nbytes
        else:
            kind, held = str(w.dtype), w.nbytes
        err = np.linalg.norm(w - dq) / max(np.linalg.norm(w), 1e-30)
        rows.append(
            dict(name=name, shape=tuple(w.shape), format=kind, bytes=int(held),
                 bf16_bytes=int(w.size * 2), rel_error=float(err),
                 max_abs_error=float(np.abs(w - dq).max()))
        )  # fmt: skip
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [
        f"{'matrix':24} {'shape':>14} {'format':>14} {'bytes':>11} {'vs bf16':>8} "
        f"{'rel err':>9} {'max err':>9}"
    ]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"{r['name']:24} {shape:>14} {r['format']:>14} {r['bytes']:>11,} "
            f"{r['bytes'] / r['bf16_bytes']:>7.3f}x {r['rel_error']:>9.2e} "
            f"{r['max_abs_error']:>9.2e}"
        )
    held, bf16 = sum(r["bytes"] for r in rows), sum(r["bf16_bytes"] for r in rows)
    lines.append(f"{'total':24} {'':>14} {'':>14} {held:>11,} {held / bf16:>7.3f}x")
    return "\n".join(lines)
