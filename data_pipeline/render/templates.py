"""Chat templates: Conversation -> rendered text + the character spans that train.

A template renders a conversation to one string and reports, for every assistant turn, the
character span of what the model must learn to produce: by the mask rule (rendering.py), the text
after the turn's generation prompt through the end-of-turn marker. Everything else (system, user,
tool results, role headers, the newline after the end-of-turn marker, template text the
generation prompt already holds) never trains. encoding.py turns these spans into a per-token
mask after tokenizing the whole text once.

Built-in templates (builtin_templates.py: chatml = qwen, qwen3, deepseek-r1, llama3, chatglm,
zh_plain) are exact by construction. Jinja templates (the tokenizer's own, or a file) live in
jinja_template.py, which derives the same spans from renders. Text from the data that spells a
special token is never a special token (special_text.py).

Template arguments (`data.template_kwargs`, per source `template_kwargs`, e.g. enable_thinking)
reach the Jinja render and its generation prompt exactly as apply_chat_template passes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.render import builtin_templates
from data_pipeline.render.builtin_templates import TEMPLATE_KWARGS, BuiltinTemplate
from data_pipeline.errors import TemplateError
from data_pipeline.render.jinja_template import JinjaTemplate
from data_pipeline.render.reasoning import REASONING_TURNS
from data_pipeline.render.rendering import ChatTemplate, Rendered, conversation_to_dicts
from data_pipeline.render.special_text import GuardedTemplate, SpecialTextGuard

__all__ = ["BUILTIN_NAMES", "ChatTemplate", "Rendered", "TemplateSpec", "build_template", "conversation_to_dicts",
           "source_template_spec", "template_spec"]

BUILTIN_NAMES = ("chatml", "qwen", "qwen3", "deepseek-r1", "llama3", "chatglm", "zh_plain")


@dataclass(frozen=True)
class TemplateSpec:
    """Everything needed to rebuild a template in a worker process (picklable, tokenizer-free)."""

    name: str
    jinja_source: str = ""
    special_tokens: dict = field(default_factory=dict)
    eos_token: str = ""
    has_glm_prefix: bool = False
    special_texts: tuple = ()
    """Texts of the tokenizer's special tokens: in the data they are escaped (special_text.py).
    Not part of the fingerprint: the tokenizer fingerprint already covers them."""
    kwargs: dict = field(default_factory=dict)
    """Template arguments (enable_thinking, ...), passed to every render and generation prompt."""
    reasoning_turns: str = "template"
    """template | every_turn (reasoning.py)."""

    def fingerprint(self) -> str:
        blob = json.dumps([self.name, self.jinja_source, self.eos_token, self.has_glm_prefix, self.kwargs,
                           self.reasoning_turns], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_kwargs(name: str, kwargs: dict, key: str) -> None:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TemplateError(f"template_kwargs must be a mapping of names to values, got {kwargs!r}", field=key)
    known = TEMPLATE_KWARGS.get(name, ())
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        takes = f"takes only {list(known)}" if known else "takes no template_kwargs"
        raise TemplateError(f"built-in template {name!r} {takes}; got {unknown}", field=key)
    if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
        raise TemplateError(f"enable_thinking must be true or false, got {kwargs['enable_thinking']!r}", field=key)


def _missing_markers(template: BuiltinTemplate, tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [m for m in template.markers if m and m not in vocab]


def template_spec(name: str, tokenizer, kwargs: dict | None = None, reasoning_turns: str = "template",
                  key: str = "template") -> TemplateSpec:
    """Resolve a template name against a tokenizer: auto = the tokenizer's own chat_template if it
    has one, else chatml; qwen = chatml; anything else not built in is a path to a Jinja file.
    A built-in template whose markers are not tokens of this tokenizer is refused (`key` names the
    config key in messages)."""
    kwargs = dict(kwargs or {})
    if reasoning_turns not in REASONING_TURNS:
        raise TemplateError(f"reasoning_turns {reasoning_turns!r} is not one of {REASONING_TURNS}",
                            field="reasoning_turns")
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    special_texts = tuple(sorted(t.content for t in tokenizer.added_tokens_decoder.values() if t.special))
    eos = tokenizer.eos_token or ""
    vocab = tokenizer.get_vocab()
    glm = "[gMASK]" in vocab and "<sop>" in vocab
    if name == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, str) and source:
            return TemplateSpec("tokenizer", source, special, eos, special_texts=special_texts, kwargs=kwargs,
                                reasoning_turns=reasoning_turns)
        name = "chatml"
    if name == "qwen":
        name = "chatml"
    if name in BUILTIN_NAMES:
        if name in ("chatglm", "zh_plain") and not eos:
            raise TemplateError(f"template {name!r} ends answers with the tokenizer's eos_token, and this tokenizer "
                                "has none", field=key)
        _check_kwargs(name, kwargs, key.replace("template", "template_kwargs"))
        spec = TemplateSpec(name, "", special, eos, glm, special_texts, kwargs, reasoning_turns)
        missing = _missing_markers(_builtin(spec), tokenizer)
        if missing:
            raise TemplateError(f"template {name!r} writes {missing}, which this tokenizer does not have as tokens: "
                                "they would train as plain-text pieces; choose the model's own template (auto) or "
                                "a tokenizer of that family", field=key)
        return spec
    path = Path(name)
    if not path.is_file():
        raise TemplateError(f"unknown template {name!r}: not one of auto, {', '.join(BUILTIN_NAMES)} and not a file",
                            field=key)
    return TemplateSpec(f"file:{path.name}", path.read_text(encoding="utf-8"), special, eos,
                        special_texts=special_texts, kwargs=kwargs, reasoning_turns=reasoning_turns)


def source_template_spec(spec, data_cfg, tokenizer) -> TemplateSpec:
    """The template of one source (a SourceSpec of data_cfg): data.template with data.template_kwargs,
    updated by the source's own template_kwargs."""
    kwargs = {**(data_cfg.template_kwargs or {}), **(spec.template_kwargs or {})}
    return template_spec(data_cfg.template, tokenizer, kwargs, data_cfg.reasoning_turns)


def build_template(spec: TemplateSpec) -> ChatTemplate:
    """The template of `spec`, guarded so that data never produces special tokens."""
    template = _unguarded_template(spec)
    if not spec.special_texts:
        return template
    return GuardedTemplate(template, SpecialTextGuard(spec.special_texts), verify=bool(spec.jinja_source))


def _builtin(spec: TemplateSpec) -> BuiltinTemplate:
    factories = {
        "chatml": lambda: builtin_templates.chatml(spec.kwargs),
        "qwen3": lambda: builtin_templates.qwen3(spec.kwargs),
        "deepseek-r1": lambda: builtin_templates.deepseek_r1(spec.kwargs),
        "llama3": lambda: builtin_templates.llama3(spec.kwargs),
        "chatglm": lambda: builtin_templates.chatglm(spec.has_glm_prefix, spec.eos_token),
        "zh_plain": lambda: builtin_templates.zh_plain(spec.eos_token),
    }
    return factories[spec.name]()


def _unguarded_template(spec: TemplateSpec) -> ChatTemplate:
    if spec.jinja_source:
        return JinjaTemplate(spec.name, spec.jinja_source, spec.special_tokens, spec.eos_token or None, spec.kwargs)
    return _builtin(spec)
