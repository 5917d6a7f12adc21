"""Tokenizer (a `tokenizers` BPE built from GGUF metadata, or tokenizer.json) and chat templates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jaxllm.errors import JaxLLMError

# Pre-tokenizer split patterns keyed by GGUF's `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_CONTROL = 3  # GGUF token type of special tokens such as <|im_end|>
_USER_DEFINED = 4


def _byte_level_pretokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    split = _SPLITS.get(pre or "")
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    # GPT-2's split, which is what SmolLM ("smollm") and plain "gpt2" vocabularies were
    # trained with (HF transformers' GGUF loader uses the same).
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise JaxLLMError("this model has no chat template; pass plain prompts instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise JaxLLMError(f"chat message {m!r} needs 'role' and 'content'")
        return _render(self.chat_template, messages, add_generation_prompt, self)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise JaxLLMError(
                f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE)"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _byte_level_pretokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type", []))
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL
        ]
        backend.add_special_tokens(special)
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
        if user:
            backend.add_tokens(user)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise JaxLLMError(f"{str(directory)!r} has no tokenizer.json")
        backend = HFTokenizer.from_file(str(path))
        tc: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            tc = json.loads((directory / "tokenizer_config.json").read_text())
        template = tc.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()

        def tok_id(entry: Any) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            return backend.token_to_id(entry) if entry else None

        cfg = json.loads((directory / "config.json").read_text())
        gen: dict[str, Any] = {}
        if (directory / "generation_config.json").is_file():
            gen = json.loads((directory / "generation_config.json").read_text())
        eos_ids: list[int] = []
        for source in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
            for t in source if isinstance(source, list) else [source]:
                if t is not None and t not in eos_ids:
                    eos_ids.append(int(t))
        if not eos_ids and tok_id(tc.get("eos_token")) is not None:
            eos_ids = [tok_id(tc.get("eos_token"))]
        bos = cfg.get("bos_token_id", tok_id(tc.get("bos_token")))
        if "add_bos_token" in tc:
            add_bos = bool(tc["add_bos_token"])
        else:  # Llama 3 adds BOS through tokenizer.json's post-processor instead
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos is not None and probe[:1] == [bos]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos=add_bos,
            chat_template=template,
        )


def _render(
    template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool, tok: Tokenizer
) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise JaxLLMError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    bos = tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else ""
    eos = tok.id_to_token(tok.eos_token_ids[0]) if tok.eos_token_ids else ""
    return env.from_string(template).render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
