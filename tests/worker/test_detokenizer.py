"""The incremental detokenizer gives exactly what a full decode gives, on the real tokenizer of a
built model: random outputs full of byte-fallback runs (valid and invalid UTF-8), special tokens
and bare spaces, prompts ending inside a character, and stop strings found while generating."""

import random

import pytest

from core.registry import ModelSpec
from core.runs import WorkItem
from core.schemas import ResolvedParams
from worker.detokenizer import CONTEXT
from worker.runner import ModelRunner, _Sequence


@pytest.fixture(scope="module")
def runner(tiny_model):
    spec = ModelSpec(name="tiny", path=str(tiny_model), chat=False, context_length=256)
    return ModelRunner(tiny_model, spec, inter_threads=1, intra_threads=1)


def byte_id(runner, value: int) -> int:
    return runner.vocabulary.index(f"<0x{value:02X}>")


def random_ids(runner, rng: random.Random, n: int) -> list[int]:
    """Ids a model could emit, weighted towards what is hard to decode piecewise."""
    chars = "é€😀中"
    space = runner.vocabulary.index("▁")
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.2:
            out.append(rng.choice(sorted(runner.byte_ids)))  # any byte: often invalid UTF-8
        elif r < 0.4:  # a multi-byte character as bytes, sometimes cut short
            raw = rng.choice(chars).encode()
            out.extend(byte_id(runner, b) for b in raw[: rng.randint(1, len(raw))])
        elif r < 0.45:
            out.append(rng.choice(sorted(runner.special_ids)))
        elif r < 0.5:
            out.append(space)
        else:
            out.append(rng.randrange(len(runner.vocabulary)))
    return out


def test_pieces_add_up_to_the_full_decode(runner):
    rng = random.Random(1)
    for _ in range(3000):
        prompt = random_ids(runner, rng, rng.randint(0, 6))
        output = random_ids(runner, rng, rng.randint(0, 24))
        decoder = runner.stream_decoder(prompt)
        pieces = [decoder.push(i) for i in output] + [decoder.finish()]
        want = runner.decode_continuation(prompt, output)
        assert "".join(pieces) == decoder.text == want, (prompt, output)


def one_row(runner, prompt: list[int], output: list[int]) -> str:
    """A row's text decoded on its own, as the worker decoded each row before batches decoded
    together (``decode_continuations``): the prompt's tail with the output, less the tail's text."""
    backend = runner.tokenizer.backend
    tail = [i for i in prompt[-CONTEXT:] if i not in (runner.bos_id, runner.eos_id)]
    if not tail:
        return backend.decode(output, skip_special_tokens=True)
    head = backend.decode(tail, skip_special_tokens=True)
    full = backend.decode(tail + output, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else backend.decode(output, skip_special_tokens=True)


def test_a_batch_decoded_together_reads_as_each_row_alone(runner):
    rng = random.Random(2)
    euro = [byte_id(runner, b) for b in "€".encode()]
    for _ in range(200):
        rows = [(random_ids(runner, rng, rng.randint(0, 10)), random_ids(runner, rng, rng.randint(0, 24)))
                for _ in range(rng.randint(1, 12))]
        rows.append(([runner.bos_id, euro[0]], euro[1:]))  # a prompt ending inside a character
        assert runner.decode_continuations(rows) == [one_row(runner, p, o) for p, o in rows]


def test_a_byte_run_is_held_until_it_ends(runner):
    prompt = runner.encode(item("Hello")).ids
    euro = [byte_id(runner, b) for b in "€".encode()]
    word = next(i for i, t in enumerate(runner.vocabulary) if t.startswith("▁") and t[1:].isalpha())
    decoder = runner.stream_decoder(prompt)
    assert [decoder.push(i) for i in euro] == ["", "", ""]  # nothing final inside the run
    assert decoder.push(word) == "€ " + runner.vocabulary[word][1:]
    # An invalid run turns every one of its bytes into U+FFFD, as the full decode does.
    decoder = runner.stream_decoder(prompt)
    bad = euro[:2] + [byte_id(runner, 0x41)]
    assert [decoder.push(i) for i in bad] == ["", "", ""]
    assert decoder.finish() == runner.decode_continuation(prompt, bad) == "\ufffd\ufffd\ufffd"


def test_a_prompt_ending_inside_a_character_is_completed_by_the_output(runner):
    euro = [byte_id(runner, b) for b in "€".encode()]
    prompt = [runner.bos_id, euro[0]]
    decoder = runner.stream_decoder(prompt)
    for i in euro[1:] + [runner.vocabulary.index("▁")]:
        decoder.push(i)
    decoder.finish()
    assert decoder.text == runner.decode_continuation(prompt, euro[1:] + [runner.vocabulary.index("▁")])


def item(prompt, stop=(), **params):
    params.setdefault("max_new_tokens", 64)
    return WorkItem(id="req_1", job_id="job_1", model="tiny", status="queued", prompt=prompt, messages=None,
                    system=None, params=ResolvedParams(stop=stop, **params))


def run_sequence(runner, enc, output):
    """Feed ids to a sequence as the step callback would; returns (text, reason, tokens)."""
    seq = _Sequence(enc, runner)
    for token in output:
        if seq.push(token):
            break
    ids = output[: len(seq.ids)] if seq.reason else output
    seq.reason = seq.reason or "length"
    text = None if seq.text is not None else runner.decode_continuation(enc.ids, ids)
    return seq.finish(text), seq.reason, len(ids)


def test_stop_strings_cut_where_the_full_decode_would(runner):
    rng = random.Random(2)
    enc = runner.encode(item("The value"))
    found = exact = 0
    for _ in range(1500):
        output = [i for i in random_ids(runner, rng, 30) if i != runner.eos_id]
        full = runner.decode_continuation(enc.ids, output)
        if len(full) < 4:
            continue
        start = rng.randrange(len(full) - 2)
        stop = full[start:start + rng.randint(1, 3)]
        text, reason, tokens = run_sequence(runner, runner.encode(item("The value", stop=(stop,))), output)
        assert (text, reason) == (full[: full.find(stop)], "stop"), (output, stop)
        # Not before the token whose text reaches the stop string (a replacement character is also
        # what a byte run decodes to before it completes: skipped). It may take some tokens more
        # while it holds back text that could still change (an unfinished byte run).
        if "\ufffd" not in stop:
            first = next(k for k in range(1, len(output) + 1)
                         if stop in runner.decode_continuation(enc.ids, output[:k]))
            assert first <= tokens <= len(output), (output, stop, first)
            exact += 1
        found += 1
    assert found > 1000 and exact > 400


def test_a_stop_string_inside_a_trailing_byte_run_is_found(runner):
    enc = runner.encode(item("Price", stop=("€",)))
    euro = [byte_id(runner, b) for b in "€".encode()]
    output = [runner.vocabulary.index("▁"), *euro]  # generation ends inside the run
    assert run_sequence(runner, enc, output)[:2] == (" ", "stop")


def test_streamed_text_is_a_prefix_of_the_stored_text(runner):
    rng = random.Random(3)
    enc = runner.encode(item("Once", stop=("zzq",), delivery="stream"))
    streamed = 0
    for _ in range(300):
        output = [i for i in random_ids(runner, rng, 40) if i != runner.eos_id]
        sent: list[str] = []
        seq = _Sequence(enc, runner, on_delta=lambda _id, text, sent=sent: sent.append(text))
        for token in output:
            if seq.push(token):
                break
        stored = seq.finish(None if seq.text is not None
                            else runner.decode_continuation(enc.ids, output[: len(seq.ids)]))
        assert stored.startswith("".join(sent))
        streamed += bool(sent)
    assert streamed > 250  # it did stream, nearly every time (not just "" being a prefix of everything)


def test_whole_mode_gives_the_same_text_and_byte_level_decoders_use_it(runner, tiny_model):
    import json

    from worker.detokenizer import incremental_ok

    rng = random.Random(4)
    for _ in range(300):
        prompt = random_ids(runner, rng, rng.randint(0, 6))
        output = random_ids(runner, rng, rng.randint(0, 24))
        decoder = runner.stream_decoder(prompt).whole()
        pieces = [decoder.push(i) for i in output] + [decoder.finish()]
        assert "".join(pieces) == runner.decode_continuation(prompt, output)
    assert incremental_ok(json.loads((tiny_model / "tokenizer.json").read_text()))
    assert not incremental_ok({"decoder": {"type": "ByteLevel", "add_prefix_space": True}})
    assert not incremental_ok({"decoder": None})


def test_a_byte_level_decoder_streams_no_character_before_its_bytes_are_all_there():
    """Llama 3 and Qwen decode bytes (GPT-2's byte-level BPE): a character cut across tokens reads
    as U+FFFD until its last byte comes. The stream holds it back, so what was streamed is always
    the start of the final text (the API voids a stream that is not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from worker.detokenizer import StreamDecoder, incremental_ok

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["plain words only"] * 10, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    import json

    assert not incremental_ok(json.loads(tok.to_str()))
    prompt = tok.encode("Say:").ids
    output = tok.encode(" naïve 漢字 🙂 done").ids  # several tokens for each non-ASCII character
    final = tok.decode(prompt + output)[len(tok.decode(prompt)):]
    decoder = StreamDecoder(tok.decode, prompt, byte_ids=frozenset(), special_ids=frozenset()).whole()
    streamed = ""
    for token_id in output:
        streamed += decoder.push(token_id)
        assert "\ufffd" not in streamed and final.startswith(streamed) and decoder.text == streamed
    streamed += decoder.finish()
    assert streamed == final == " naïve 漢字 🙂 done"
    # A sequence that ends inside a character keeps the U+FFFD the full decode gives it.
    cut = StreamDecoder(tok.decode, prompt, byte_ids=frozenset(), special_ids=frozenset()).whole()
    ended = "".join(cut.push(i) for i in output[:-6])
    ended += cut.finish()
    assert ended == tok.decode(prompt + output[:-6])[len(tok.decode(prompt)):]
