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


def test_render_applies_the_template_only_where_it_belongs():
    assert render(chat_model=True, prompt="p", messages=None, system=None) == [Special.BOS, "p"]
    assert render(chat_model=True, prompt="p", messages=None, system="S")[1].startswith("[INST] <<SYS>>")
    assert render(chat_model=False, prompt="p", messages=None, system="S") == [Special.BOS, "p"]
    with pytest.raises(ValueError):
        render(chat_model=False, prompt=None, messages=[M("user", "x")], system=None)
