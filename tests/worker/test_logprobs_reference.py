"""Log probabilities are the model's: the runner's against a float32 transformers forward pass of
the same random-weight checkpoint, converted to a float32 CTranslate2 model."""

import pytest

pytestmark = pytest.mark.slow  # PyTorch and transformers build and run the checkpoint

from core.registry import ModelSpec
from core.runs import WorkItem
from core.schemas import ResolvedParams
from worker.builder import build_checkpoint
from worker.convert import convert_checkpoint
from worker.runner import ModelRunner


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("reference")
    checkpoint = build_checkpoint(root / "hf", preset="tiny", seed=5, context_length=512)
    out = convert_checkpoint(checkpoint, root / "ct2", quantization="float32", low_memory=False)
    spec = ModelSpec(name="ref", path=str(out), chat=False, context_length=512)
    runner = ModelRunner(out, spec, compute_type="float32")
    hf = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return runner, hf


def reference(hf, ids):
    """log_softmax of transformers' logits: row p is the distribution of token p + 1."""
    import torch

    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def item(prompt, n=0, continuations=None, **params):
    return WorkItem(id=f"req_{n}", job_id="job_1", model="ref", status="queued", prompt=prompt, messages=None,
                    system=None, params=ResolvedParams(**params), continuations=continuations)


def test_generated_and_echoed_tokens_carry_transformers_log_probabilities(models):
    runner, hf = models
    enc = runner.encode(item("def main(): return", max_new_tokens=10, min_new_tokens=10, temperature=0.0,
                             logprobs=True, top_logprobs=5, echo=True))
    [out] = runner.generate([enc])
    prompt, content = out.detail["logprobs"]["prompt"], out.detail["logprobs"]["content"]
    assert len(prompt) == enc.length - 1 and len(content) == out.completion_tokens == 10
    import torch

    with torch.inference_mode():  # greedy in transformers: the same tokens (test_convert checks it)
        generated = hf.generate(torch.tensor([enc.ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                pad_token_id=0)[0, enc.length:].tolist()
    assert [bytes(t["bytes"]) for t in content] == [runner.token_bytes(i) for i in generated]
    ids = enc.ids + generated
    expected = reference(hf, ids)
    tokens = prompt + content
    for p, token in enumerate(tokens, start=1):
        want = expected[p - 1]
        assert token["logprob"] == pytest.approx(float(want[ids[p]]), abs=1e-4)
        top = want.topk(5)
        assert [a["logprob"] for a in token["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        # The text's first token loses the space the decoder drops, and so do its alternatives.
        spelled = [runner.token_bytes(i) for i in top.indices.tolist()]
        if p == 1:
            spelled = [b.removeprefix(b" ") for b in spelled]
        assert [bytes(a["bytes"]) for a in token["top_logprobs"]] == spelled


def test_scored_continuations_carry_transformers_log_probabilities(models):
    runner, hf = models
    enc = runner.encode(item("The answer is", continuations=[" yes", " no, it is not"], mode="score",
                             max_new_tokens=0, logprobs=True))
    [out] = runner.generate([enc])
    for (ids, start), score in zip(enc.scored, out.detail["scores"], strict=True):
        expected = reference(hf, ids)
        want = [float(expected[p - 1][ids[p]]) for p in range(start, len(ids))]
        assert [t["logprob"] for t in score["tokens"]] == pytest.approx(want, abs=1e-4)
        assert score["logprob"] == pytest.approx(sum(want), abs=1e-3)
        greedy = all(int(expected[p - 1].argmax()) == ids[p] for p in range(start, len(ids)))
        assert score["is_greedy"] == greedy


def test_a_shared_prefix_computed_once_generates_what_each_prompt_alone_does(models):
    """CTranslate2's static_prompt for a prefix the whole batch shares: float32, greedy, the same
    tokens as each prompt run alone (int8 results may move with batch mates, as any batching)."""
    runner, _ = models
    prefix = "def main(): return the value of the first argument and the second one " * 2
    batch = [runner.encode(item(f"{prefix}case {i}", n=i, max_new_tokens=8, min_new_tokens=8, temperature=0.0))
             for i in range(4)]
    shared = runner.shared_prefix(batch)
    assert shared >= runner.STATIC_PROMPT_MIN
    together = runner.generate(batch)
    alone = [runner.generate([enc])[0] for enc in batch]
    assert [o.text for o in together] == [o.text for o in alone]


def test_rows_that_end_right_after_the_shared_prefix_still_get_only_generated_tokens(models):
    """A row of the prefix and one more token beside a long one: nothing of the long row's own
    prompt may come back as generated (CTranslate2 must pre-forward the rows' own tokens)."""
    runner, _ = models
    prefix = "def main(): return the value of the first argument and the second one " * 2
    batch = [runner.encode(item(prefix + "x", n=0, max_new_tokens=6, min_new_tokens=6, temperature=0.0)),
             runner.encode(item(prefix + "xy and then a much longer tail of its own", n=1, max_new_tokens=6,
                                min_new_tokens=6, temperature=0.0))]
    together = runner.generate(batch)
    alone = [runner.generate([enc])[0] for enc in batch]
    assert [o.completion_tokens for o in together] == [6, 6]
    assert [o.text for o in together] == [o.text for o in alone]
