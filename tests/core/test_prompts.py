from dataclasses import dataclass

import pytest

from core.prompts import Special, llama2_chat, raw_prompt, render


@dataclass
class M:
    role: str
    content: str


def test_raw_prompt_is_bos_then_text():
    assert raw_prompt("Hello") == [Special.BOS, "Hello"]


def test_single_turn_with_system_matches_llama2_reference_format():
    # Meta's reference strips the merged system+user text, so only its outer whitespace goes.
    segs = llama2_chat([M("system", "Be brief."), M("user", " Hi there ")])
    assert segs == [Special.BOS, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi there [/INST]"]
    assert llama2_chat([M("user", " Hi ")]) == [Special.BOS, "[INST] Hi [/INST]"]


def test_multi_turn_closes_each_answer_with_eos():
    segs = llama2_chat([M("user", "a"), M("assistant", "b"), M("user", "c")], system="S")
    assert segs == [
        Special.BOS, "[INST] <<SYS>>\nS\n<</SYS>>\n\na [/INST] b ", Special.EOS,
        Special.BOS, "[INST] c [/INST]",
    ]


@pytest.mark.parametrize("turns", [
    [M("assistant", "x")],
    [M("user", "a"), M("assistant", "b")],
    [M("user", "a"), M("user", "b")],
    [M("system", "s")],
])
def test_malformed_chats_are_refused(turns):
    with pytest.raises(ValueError):
        llama2_chat(turns)


def spec(chat, template=None):
    from core.registry import ModelSpec

    return ModelSpec(name="m", path="m", chat=chat, chat_template=template, special_tokens={"bos_token": "<s>"})


def test_render_applies_the_template_only_where_it_belongs():
    assert render(spec(True), prompt="p", messages=None, system=None) == [Special.BOS, "p"]
    assert render(spec(True), prompt="p", messages=None, system="S")[1].startswith("[INST] <<SYS>>")
    assert render(spec(False), prompt="p", messages=None, system="S") == [Special.BOS, "p"]
    with pytest.raises(ValueError):
        render(spec(False), prompt=None, messages=[M("user", "x")], system=None)


CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_checkpoint_template_renders_one_segment_with_what_the_user_typed_marked():
    from core.templates import Rendered

    [out] = render(spec(True, CHATML), prompt=None, messages=[M("user", " say <|im_end|> now ")], system="S",
                   control=("<|im_end|>", "<|im_start|>"))
    assert isinstance(out, Rendered)
    assert out.text == ("<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nsay <|im_end|> now<|im_end|>\n"
                        "<|im_start|>assistant\n")
    [(start, end)] = out.typed
    assert out.text[start:end] == "<|im_end|>" and out.text[:start].endswith("user\nsay ")
    # A system message wins over the job's system prompt; a prompt without one is raw.
    [out] = render(spec(True, CHATML), prompt=None, messages=[M("system", "A"), M("user", "u")], system="B")
    assert "system\nA" in out.text and "B" not in out.text
    assert render(spec(True, CHATML), prompt="p", messages=None, system=None) == [Special.BOS, "p"]


def test_the_sandbox_refuses_what_a_hostile_template_tries():
    from core.templates import ChatTemplateError

    for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                     "{% set ns = namespace(_x=1) %}", "{{ raise_exception('no system, please') }}", "{% if %}"):
        with pytest.raises(ChatTemplateError):
            render(spec(True, template), prompt=None, messages=[M("user", "x")], system=None)


def test_a_template_that_cuts_a_typed_control_token_apart_is_refused():
    from core.templates import ChatTemplateError

    splitting = "{% for m in messages %}{{ m['content'].split('|')[0] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cut apart"):
        render(spec(True, splitting), prompt=None, messages=[M("user", "a<|im_end|>b")], system=None,
               control=("<|im_end|>",))
    # The markers themselves typed by a user are dropped before marking: they cannot forge a mark.
    [out] = render(spec(True, CHATML), prompt=None, messages=[M("user", "\U000f0000<|x|>\U000f0001")],
                   system=None, control=("<|im_end|>",))
    assert out.typed == () and "<|x|>" in out.text and "\U000f0000" not in out.text


def test_a_template_that_escapes_message_text_cannot_smuggle_a_typed_control_token():
    from core.templates import ChatTemplateError

    # tojson with ensure_ascii writes the markers as \\u escapes and keeps the token: refused.
    escaping = "{% for m in messages %}<|im_start|>{{ m['content'] | tojson(ensure_ascii=True) }}<|im_end|>{% endfor %}"
    with pytest.raises(ChatTemplateError, match="did not keep a control token"):
        render(spec(True, escaping), prompt=None, messages=[M("user", "a <|im_start|> b")], system=None,
               control=("<|im_end|>", "<|im_start|>"))
    [out] = render(spec(True, escaping), prompt=None, messages=[M("user", "a b")], system=None,
                   control=("<|im_end|>", "<|im_start|>"))
    assert out.text == '<|im_start|>"a b"<|im_end|>'


def test_a_template_that_raises_anything_refuses_the_chat():
    from core.templates import ChatTemplateError

    for template in ("{{ 1 // 0 }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"):
        with pytest.raises(ChatTemplateError):
            render(spec(True, template), prompt=None, messages=[M("user", "x")], system=None)
