"""A checkpoint's own chat template, rendered in a sandbox as its authors render it, with the
control tokens a user types kept as text.

Checkpoints ship their chat format as a Jinja template in ``tokenizer_config.json`` (or
``chat_template.jinja``). transformers renders it in Jinja's ``ImmutableSandboxedEnvironment``
(``trim_blocks``, ``lstrip_blocks``, loop controls, a ``{% generation %}`` tag, and the globals
``raise_exception``, ``strftime_now``, ``dict``, ``namespace`` and a ``tojson`` that does not
escape HTML), then tokenizes the whole text with added tokens parsed. We do the same, so a chat
renders to the very ids ``apply_chat_template(..., tokenize=True)`` gives, with one difference:
a template's text is trusted and a user's is not.

Before rendering, every control token inside a message (the model's special tokens, and the added
tokens the template itself writes) is wrapped in two private-use markers; after rendering, the
markers are taken out again and the spans they wrapped are recorded as ``Rendered.typed``. The
tokenizer then keeps those spans as text (``worker.tokenizing``), so "<|im_start|>system" typed in
a message is text, never a turn. A template that cuts a marked token apart (``split`` on it, say)
would let the pieces join into a control token on their own: such a chat is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Unicode private-use code points of plane 15; taken out of user text before marking.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"

# The variables transformers passes a template besides the messages: its special tokens by role.
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the chat (its ``raise_exception``), or could not render it."""


@dataclass(frozen=True)
class Rendered:
    """A chat rendered by a template: tokenized whole with added tokens parsed, except the
    ``typed`` spans (start, end), which are control tokens a user typed and stay text."""

    text: str
    typed: tuple[tuple[int, int], ...] = ()

    def extended(self, text: str, control: Sequence[str]) -> Rendered:
        """This text followed by user ``text`` (a continuation to score), its control tokens typed."""
        at = len(self.text)
        spans = tuple((at + m.start(), at + m.end()) for m in control_pattern(tuple(control)).finditer(text))
        return Rendered(self.text + text, self.typed + spans)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks an assistant's tokens for training): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's own signature trick)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not set {name!r} on a namespace")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _raise(message: str) -> None:
    raise ChatTemplateError(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox (raises ``ChatTemplateError`` on a syntax error).
    Jinja2 before 3.1.6 has known sandbox escapes, and a checkpoint's template is code from
    whoever published it: those are refused, as transformers refuses them."""
    if _version(jinja2.__version__) < (3, 1, 6):
        raise ChatTemplateError(f"chat templates need jinja2 3.1.6 or newer (sandbox escapes); this is {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_make_dict, namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


@lru_cache(maxsize=64)
def literal_text(source: str) -> str:
    """The template's own strings (its text and string constants), joined by NULs so that no
    search matches across two of them."""
    ast = compile_template(source).environment.parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


def control_tokens(added: Iterable[tuple[str, bool]], source: str | None) -> tuple[str, ...]:
    """The tokens a user may not produce from text: every special added token, and every other
    added token the template writes itself (except whitespace ones, which templates write as text).
    ``added`` is (content, special) of each added token of the tokenizer."""
    literal = literal_text(source) if source else ""
    return tuple(sorted({content for content, special in added
                         if special or (content in literal and not content.isspace())}))


@lru_cache(maxsize=64)
def control_pattern(control: tuple[str, ...]) -> re.Pattern[str]:
    """A pattern matching any control token, longer ones first (a token before those it contains)."""
    ordered = sorted(control, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")


@dataclass(frozen=True)
class ChatTemplate:
    """One model's chat template with the variables it is rendered with."""

    source: str
    variables: Mapping[str, str]  # bos_token, eos_token, ... as transformers passes them
    control: tuple[str, ...]

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> Rendered:
        """The chat as the model reads it; raises ``ChatTemplateError`` where the template refuses it."""
        pattern = control_pattern(self.control)

        def mark(text: str) -> str:
            text = text.replace(MARK_START, "").replace(MARK_END, "")
            return pattern.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", text)

        chat = [{key: mark(value) if isinstance(value, str) else value for key, value in m.items()} for m in messages]
        rendered = _unmark(self._render(chat, add_generation_prompt), pattern)
        if any(MARK_START in m.get("content", "") for m in chat):
            # A template that escapes or rewrites message text (``tojson``, say) could drop the
            # markers and keep a typed control token: then there are more control tokens outside
            # the typed spans than the same chat has with those tokens replaced by inert text.
            inert = [{key: value.replace(MARK_START, "").replace(MARK_END, "") if isinstance(value, str) else value
                      for key, value in m.items()} for m in chat]
            inert = [{key: pattern.sub("\U000f0002", v) if isinstance(v, str) else v for key, v in m.items()}
                     for m in inert]
            expected = len(pattern.findall(self._render(inert, add_generation_prompt)))
            if _outside(rendered, pattern) > expected:
                raise ChatTemplateError("the chat template did not keep a control token a message contains apart "
                                      "from its own; remove it from the message")
        return rendered

    def _render(self, chat: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return str(compile_template(self.source).render(
                messages=chat, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.variables))
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:  # a sandbox refusal, an undefined call, ...
            raise ChatTemplateError(f"the chat template could not render this chat: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - whatever a template's code raised: this chat is refused
            raise ChatTemplateError(f"the chat template could not render this chat: {type(exc).__name__}: {exc}"
                                  ) from None


def _outside(rendered: Rendered, pattern: re.Pattern[str]) -> int:
    """Control tokens in the text outside the typed spans."""
    typed = set(rendered.typed)
    return sum(1 for m in pattern.finditer(rendered.text) if (m.start(), m.end()) not in typed)


def _unmark(text: str, pattern: re.Pattern[str]) -> Rendered:
    marked = re.compile(f"{MARK_START}({pattern.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
    out: list[str] = []
    typed: list[tuple[int, int]] = []
    at = 0  # length of the text written so far
    last = 0
    for m in marked.finditer(text):
        out.append(text[last:m.start()])
        at += m.start() - last
        last = m.end()
        if m.group(1) is None:
            raise ChatTemplateError("the chat template cut apart a control token a message contains "
                                  "(so its pieces could join into one); remove it from the message")
        out.append(m.group(1))
        typed.append((at, at + len(m.group(1))))
        at += len(m.group(1))
    out.append(text[last:])
    return Rendered("".join(out), tuple(typed))
