"""Prompt templates, as segments: text to tokenize, special tokens to insert by id, and chats a
checkpoint's own template rendered (``core.templates``).

The Llama-2 chat format (Meta's reference ``chat_completion``)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]

BOS and EOS are inserted as token ids, never as text, and every text segment is tokenized with
special-token parsing off, so a prompt that contains ``<s>`` or ``[INST]`` stays plain text and
cannot forge a turn boundary. Each text segment is tokenized on its own, as Meta's reference does.

Every other chat model renders with the template its checkpoint ships, into one ``Rendered``
segment whose control tokens a user typed stay text (see ``core.templates``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Protocol

from core.templates import ChatTemplate, Rendered


class Special(Enum):
    """A special token, inserted by id."""

    BOS = "bos"
    EOS = "eos"


Segment = str | Special | Rendered

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Message(Protocol):
    role: str
    content: str


class PromptModel(Protocol):
    """What rendering needs to know of a model (``core.registry.ModelSpec`` has it)."""

    @property
    def chat(self) -> bool: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def special_tokens(self) -> Mapping[str, str]: ...
    @property
    def add_bos(self) -> bool: ...


def raw_prompt(prompt: str, add_bos: bool = True) -> list[Segment]:
    """A base-model prompt: BOS (where the model's tokenizer puts one) then the text as given."""
    return [Special.BOS, prompt] if add_bos else [prompt]


def llama2_chat(messages: Sequence[Message], system: str | None = None) -> list[Segment]:
    """Render a chat in the Llama-2 format.

    ``messages`` are ``user``/``assistant`` turns, alternating and ending with ``user``, optionally
    preceded by one ``system`` message (which wins over ``system``). Callers validate the shape;
    this raises ``ValueError`` if it is wrong anyway.
    """
    turns = list(messages)
    if turns and turns[0].role == "system":
        system = turns[0].content
        turns = turns[1:]
    if not turns or len(turns) % 2 == 0:
        raise ValueError("a chat must alternate user/assistant turns and end with a user turn")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(f"message {i} should have role {expected!r}, not {turn.role!r}")

    contents = [t.content for t in turns]
    if system:
        contents[0] = f"{B_SYS}{system}{E_SYS}{contents[0]}"
    segments: list[Segment] = []
    for user, answer in zip(contents[0::2], contents[1::2], strict=False):
        segments += [Special.BOS, f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", Special.EOS]
    segments += [Special.BOS, f"{B_INST} {contents[-1].strip()} {E_INST}"]
    return segments


def render(
    model: PromptModel, *, prompt: str | None, messages: Sequence[Message] | None, system: str | None,
    control: Sequence[str] = (),
) -> list[Segment]:
    """The segments for one request, by the rule of the product.

    A chat model gets its chat format when the request gives ``messages`` or a ``system``
    prompt; otherwise (and always for a base model) the raw prompt is used. ``control`` are the
    model's control tokens (``core.templates.control_tokens``); without them a rendered chat has
    the right text but no record of what a user typed, which is enough to bound its length.
    Raises ``ValueError`` (``ChatTemplateError`` where the checkpoint's template refuses the chat).
    """
    if messages is None:
        assert prompt is not None
        if not (model.chat and system):
            return raw_prompt(prompt, model.add_bos)
        messages = [_UserTurn(prompt)]
    elif not model.chat:
        raise ValueError("chat messages need a chat model; send a prompt to a base model")
    if model.chat_template is None:
        return llama2_chat(messages, system)
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if system and turns[0]["role"] != "system":  # a system message wins over the job's system prompt
        turns.insert(0, {"role": "system", "content": system})
    template = ChatTemplate(model.chat_template, model.special_tokens, tuple(control))
    return [template.render(turns)]


class _UserTurn:
    role = "user"

    def __init__(self, content: str) -> None:
        self.content = content


def with_continuation(segments: Sequence[Segment], continuation: str, control: Sequence[str] = ()) -> list[Segment]:
    """The segments of a prompt followed by a continuation to score, as the model would read them:
    the continuation joins the prompt's last text (after a Llama-2 chat prompt's ``[/INST]`` with
    the space the template writes before an answer; after a rendered chat, as the answer's text,
    with the control tokens it holds kept as text)."""
    joined = list(segments)
    if joined and isinstance(joined[-1], Rendered):
        joined[-1] = joined[-1].extended(continuation, control)
        return joined
    if joined and isinstance(joined[-1], str) and joined[-1].endswith(E_INST) and not continuation[0].isspace():
        continuation = " " + continuation
    if joined and isinstance(joined[-1], str):
        joined[-1] = joined[-1] + continuation
    else:
        joined.append(continuation)
    return joined
