"""The runner on a real CTranslate2 model built by the builder (tiny preset, int8)."""

import pytest

from core.registry import ModelSpec
from core.runs import WorkItem
from core.schemas import ResolvedParams
from worker.runner import ModelRunner
from worker.tokenizing import RequestError


@pytest.fixture(scope="module")
def runner(tiny_model):
    spec = ModelSpec(name="tiny-chat", path=str(tiny_model), chat=True, context_length=256)
    return ModelRunner(tiny_model, spec, inter_threads=1, intra_threads=1)


def item(prompt=None, messages=None, system=None, n=0, **params):
    params.setdefault("max_new_tokens", 16)
    return WorkItem(id=f"req_{n}", job_id="job_1", model="tiny-chat", status="queued", prompt=prompt,
                    messages=messages, system=system, params=ResolvedParams(**params))


def test_raw_prompt_is_bos_plus_text(runner):
    enc = runner.encode(item("Hello world"))
    assert enc.ids[0] == runner.bos_id and runner.eos_id not in enc.ids
    assert enc.ids[1:] == runner.tokenizer.encode_texts(["Hello world"])[0]
    assert enc.tokens == [runner.vocabulary[i] for i in enc.ids]


def test_chat_template_places_bos_eos_by_id_and_typed_tags_stay_text(runner):
    messages = [{"role": "user", "content": "hi <s> [INST] </s>"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "again"}]
    enc = runner.encode(item(messages=messages, system="Be brief."))
    assert [i for i, t in enumerate(enc.ids) if t == runner.bos_id][0] == 0
    assert enc.ids.count(runner.bos_id) == 2 and enc.ids.count(runner.eos_id) == 1  # one per closed turn
    text = runner.tokenizer.decode(enc.ids)
    assert "<<SYS>>\nBe brief.\n<</SYS>>" in text and "hi <s> [INST] </s>" in text


def test_requests_in_one_batch_keep_their_own_max_new_tokens(runner):
    # Greedy: deterministic, so an early end token (random weights) cannot make this flaky.
    batch = [runner.encode(item("one", n=1, max_new_tokens=3, temperature=0.0)),
             runner.encode(item("two two", n=2, max_new_tokens=7, temperature=0.0))]
    out = runner.generate(batch)
    assert [o.completion_tokens for o in out] == [3, 7]
    assert [o.finish_reason for o in out] == ["length", "length"]
    assert [o.request_id for o in out] == ["req_1", "req_2"] and all(o.ok for o in out)
    assert out[0].prompt_tokens == batch[0].length


def test_stop_sequence_cuts_the_text_inside_a_shared_batch(runner):
    greedy = dict(temperature=0.0, max_new_tokens=24)
    for prompt in ("The function", "The class", "A module", "Each value", "In the loop"):
        full = runner.generate([runner.encode(item(prompt, **greedy))])[0]
        stops = [full.text[i:i + 2] for i in range(2, len(full.text) - 2) if full.text[i:i + 2].strip()]
        if full.finish_reason == "length" and stops:
            break
    else:
        pytest.fail("no probe prompt produced enough text")
    stop = stops[0]
    expected = full.text[: full.text.find(stop)]
    out = runner.generate([runner.encode(item(prompt, n=1, stop=(stop,), **greedy))])[0]
    assert (out.text, out.finish_reason) == (expected, "stop")
    assert out.completion_tokens < 24


def test_decoding_keeps_the_leading_space_of_the_first_token(runner):
    word = next(t for t in runner.vocabulary if t.startswith("▁") and len(t) > 3 and t[1:].isalpha())
    prompt = runner.encode(item("Hello"))
    assert runner.decode_continuation(prompt.ids, [runner.vocabulary.index(word)]) == " " + word[1:]


def test_prompt_longer_than_the_context_fails_alone(runner):
    with pytest.raises(RequestError) as err:
        runner.encode(item("word " * 300, max_new_tokens=8))
    assert err.value.code == "context_length_exceeded"


def test_submit_time_token_count_equals_what_the_worker_feeds_the_model(runner, tiny_model):
    from core.prompts import render
    from core.schemas import ChatMessage
    from core.tokens import TokenCounter, token_upper_bound

    counter = TokenCounter(tiny_model / "tokenizer.json")
    cases = [
        item("Hello <s> world </s> [INST] é 漢字 \x01"),
        item(messages=[{"role": "user", "content": "a [/INST] b"}, {"role": "assistant", "content": "c"},
                       {"role": "user", "content": " d "}], system="sys <<SYS>>"),
        item("x" * 200, max_new_tokens=8),
    ]
    for it in cases:
        messages = [ChatMessage(**m) for m in it.messages] if it.messages else None
        segments = render(runner.spec, prompt=it.prompt, messages=messages, system=it.system)
        assert counter.count(segments) == runner.encode(it).length <= token_upper_bound(segments)


def test_the_worker_tokenizes_exactly_as_transformers_does(runner, tiny_model):
    # The worker reads tokenizer.json with the tokenizers library alone (no transformers, no
    # PyTorch in a serving process); what it feeds the model must not change because of that.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model))
    texts = ["Hello world", " leading space", "<s> [INST] typed tags </s>", "naïve café €5 😀", "\n\n  x\t",
             "", "<unk>", "a" * 300, "中文字符"]
    want = hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert runner.tokenizer.encode_texts(texts) == want
    assert (runner.bos_id, runner.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert runner.special_ids == frozenset(hf.all_special_ids)
    ids = want[3] + [runner.bos_id] + want[2]
    assert runner.tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_a_round_encoded_at_once_equals_each_request_encoded_alone(runner):
    from dataclasses import replace

    messages = [{"role": "user", "content": "hi <s> there"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "again, ünïcode ☃"}]
    items = [item("Hello world", n=0), item(messages=messages, system="Be brief.", n=1),
             replace(item(n=2), prompt_ids=[5, 6, 7]), item("word " * 300, n=3),  # too long for the context
             item("", n=4), replace(item(n=5), prompt_ids=[runner.bos_id, 9, 99999]),  # an id past the vocabulary
             item("Question: why?", n=6, mode="score", max_new_tokens=0, logprobs=True)]
    together = runner.encode_many(items)
    assert len(together) == len(items)
    for one, alone_item in zip(together, items, strict=True):
        try:
            alone = runner.encode(alone_item)
        except RequestError as exc:
            assert isinstance(one, RequestError) and (one.code, one.message) == (exc.code, exc.message)
            continue
        assert not isinstance(one, RequestError)
        assert (one.ids, one.tokens, one.shown, one.scored) == (alone.ids, alone.tokens, alone.shown, alone.scored)
    assert [type(r).__name__ for r in together].count("RequestError") == 2


class Recording:
    """The runner's CTranslate2 generator, recording whether each call had a step callback."""

    def __init__(self, generator):
        self.generator, self.callbacks = generator, []

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def generate_batch(self, *args, **kwargs):
        self.callbacks.append(kwargs.get("callback") is not None)
        return self.generator.generate_batch(*args, **kwargs)


def test_a_batch_whose_rows_share_their_length_and_have_no_stop_runs_without_a_step_callback(runner):
    recording = Recording(runner.generator)
    runner.generator = recording
    try:
        plain = [runner.encode(item(f"prompt {i}", n=i, max_new_tokens=5)) for i in range(3)]
        outcomes = runner.generate(plain)
        assert [o.completion_tokens for o in outcomes if o.finish_reason == "length"] and all(
            o.completion_tokens <= 5 for o in outcomes)
        stopping = [runner.encode(item("prompt", n=9, max_new_tokens=5, stop=["e"])), *plain[:1]]
        runner.generate(stopping)
        mixed = [runner.encode(item("prompt", n=10, max_new_tokens=2)), *plain[:1]]
        outcomes = runner.generate(mixed)
        assert outcomes[0].completion_tokens <= 2
    finally:
        runner.generator = recording.generator
    # Python runs for every token of every row only where a row needs it: a stop string to find,
    # or a row to stop before the others.
    assert recording.callbacks == [False, True, True]
