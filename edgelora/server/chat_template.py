"""A package's chat template, rendered as transformers' ``apply_chat_template`` renders it, without transformers.

Same jinja2 environment (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls), same
globals (``raise_exception``, ``strftime_now``, a JSON ``tojson`` that does not escape HTML), the
tokenizer's special tokens as variables, and the rendered text tokenized without adding special
tokens again, since the template writes them itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgelora.errors import EdgeLoraError

from .api_errors import ApiError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise EdgeLoraError(f"{where}: the chat template does not parse (line {e.lineno}: {e.message})") from None
        self.special_tokens = special_tokens

    @classmethod
    def from_package(cls, package: Path) -> "ChatTemplate | None":
        """``chat_template.jinja`` if the package has one (transformers' own file since 4.x), else the
        ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named templates: "default")."""
        config_path = package / CONFIG_FILE
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EdgeLoraError(f"{config_path}: not valid JSON ({e})") from None
        special = {key: _token_text(config.get(key)) for key in SPECIAL_TOKENS if _token_text(config.get(key))}
        template_path = package / TEMPLATE_FILE
        if template_path.is_file():
            return cls(template_path.read_text(), special, str(template_path))
        source = config.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if source is None:
            return None
        if not isinstance(source, str):
            raise EdgeLoraError(f"{config_path}: chat_template must be a string or a list of named templates")
        return cls(source, special, str(config_path))

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ApiError(400, f"messages: the model's chat template refused them ({e})", code="invalid_value",
                           param="messages") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json holds it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
