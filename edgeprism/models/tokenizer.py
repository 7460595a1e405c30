"""Tokenizer of a Hugging Face model directory (tokenizer.json) and its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from edgeprism.errors import CheckpointError, InputError, TokenizerMissingError


class Tokenizer:
    """encode/decode text; render chat messages with the checkpoint's Jinja chat template."""

    def __init__(self, directory: Path) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{directory / 'tokenizer.json'} cannot be read ({e}); re-save the tokenizer.") from e
        self.config: dict[str, Any] = {}
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            self.config = json.loads(cfg.read_text())
        self.chat_template: str | None = self.config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token is not None

    @classmethod
    def from_dir(cls, directory: Path) -> "Tokenizer | None":
        """None when the directory has no tokenizer.json (id-level use only)."""
        return cls(directory) if (directory / "tokenizer.json").is_file() else None

    @property
    def eos_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self._tok.token_to_id(self.bos_token) if self.add_bos else None
        return ([bos] + ids) if bos is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise InputError("this model has no chat template (tokenizer_config.json 'chat_template'); "
                             "pass a plain prompt instead of messages.")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts.")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise_template_error(message: str) -> None:
    raise InputError(f"the chat template rejected the messages: {message}")


def missing_tokenizer(directory: Path | None) -> TokenizerMissingError:
    return TokenizerMissingError(f"{directory or 'this in-memory model'} has no tokenizer.json, so text calls cannot work; use "
                                 "Engine.generate_ids / Engine.logits with token ids, or add the tokenizer files.")
