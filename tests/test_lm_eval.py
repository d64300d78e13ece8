"""EleutherAI's lm-eval, a client nobody here wrote, against batchgen: its ``local-completions``
model with no extra arguments (it finds batchgen's /tokenizer_info and /tokenize itself, so it
needs no model hub and no transformers) runs a multiple-choice task (loglikelihoods through
echo + logprobs) and a generate_until task from local files, and its loglikelihoods equal what a
batchgen scoring job gives for the same texts.

lm-eval runs from its own virtual environment (``.venv-lmeval``, which ``make test`` makes: it
pulls datasets, scikit-learn and more that batchgen does not need), as a user would run it.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LM_EVAL = Path(__file__).resolve().parents[1] / ".venv-lmeval" / "bin" / "lm_eval"

MC_TASK = """task: batchgen_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """task: batchgen_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "Q:", "Question:", "###", "</answer>"]
  max_gen_toks: 8
  temperature: 0.0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def lm_eval():
    if not LM_EVAL.exists():
        pytest.skip(f"lm-eval is not installed at {LM_EVAL} (make test installs it)")
    return LM_EVAL


def test_lm_eval_runs_multiple_choice_and_generation_against_batchgen(lm_eval, served, tmp_path):
    api, worker, _, token = served
    data, tasks, out = tmp_path / "data", tmp_path / "tasks", tmp_path / "out"
    for d in (data, tasks):
        d.mkdir()
    questions = [("What colour is the sky?", ["blue", "green", "red"], 0),
                 ("How many legs has a cat?", ["two", "four"], 1),
                 ("Which is a fruit?", ["apple", "stone", "cloud"], 0)]
    (data / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n"
                                           for q, c, a in questions))
    (data / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": c[a]}) + "\n"
                                            for q, c, a in questions))
    (tasks / "batchgen_mc.yaml").write_text(MC_TASK.format(data=data / "mc.jsonl"))
    (tasks / "batchgen_gen.yaml").write_text(GEN_TASK.format(data=data / "gen.jsonl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENAI_"))}
    env.update(OPENAI_API_KEY=token, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [str(lm_eval), "run", "--model", "local-completions",
         "--model_args", f"model=tiny-chat,base_url={api.url}/v1/completions",
         "--tasks", "batchgen_mc,batchgen_gen", "--include_path", str(tasks), "--output_path", str(out),
         "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}\n{worker.log()[-2000:]}"
    assert "Remote tokenizer not supported" not in done.stderr  # it tokenized through batchgen

    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert set(results) == {"batchgen_mc", "batchgen_gen"}
    assert 0.0 <= results["batchgen_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["batchgen_gen"]["exact_match,none"] <= 1.0

    # Its loglikelihoods are batchgen's scoring job's for the same (context, continuation) pairs.
    [mc_samples] = out.rglob("samples_batchgen_mc_*.jsonl")
    samples = [json.loads(line) for line in mc_samples.read_text().splitlines()]
    assert len(samples) == len(questions)
    requests = []
    expected = []
    for sample in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]  # gen_args_0, 1, ... in order
        contexts = {c for c, _ in pairs}
        assert len(contexts) == 1
        requests.append({"prompt": contexts.pop(), "continuations": [cont for _, cont in pairs]})
        expected.append([resp[0] for resp in sample["resps"]])  # [loglikelihood, is_greedy] as strings
    created = api.http.post(f"{api.url}/v1/jobs", timeout=30,
                            json={"model": "tiny-chat", "kind": "score", "requests": requests})
    assert created.status_code == 202, created.text
    job = api.wait_for_job(created.json()["id"])
    assert job["status"] == "completed", worker.log()
    rows = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results", timeout=30).json()["data"]
    for row, lm in zip(rows, expected, strict=True):
        ours = [(s["logprob"], s["is_greedy"]) for s in row["scores"]]
        theirs = [(float(ll), greedy == "True") for ll, greedy in lm]
        assert [o[0] for o in ours] == pytest.approx([t[0] for t in theirs], abs=1e-4)
        assert [o[1] for o in ours] == [t[1] for t in theirs]

    [gen_samples] = out.rglob("samples_batchgen_gen_*.jsonl")
    generations = [json.loads(line) for line in gen_samples.read_text().splitlines()]
    assert len(generations) == len(questions) and all(isinstance(g["resps"][0][0], str) for g in generations)


def test_lm_eval_chat_completions_runs_a_generation_task(lm_eval, served, tmp_path):
    """``local-chat-completions`` (generate_until only: lm-eval has no loglikelihood for chat; it
    requires --apply_chat_template of itself)."""
    api, worker, _, token = served
    data, tasks, out = tmp_path / "data", tmp_path / "tasks", tmp_path / "out"
    for d in (data, tasks):
        d.mkdir()
    (data / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                            for q, a in (("Capital of France?", "Paris"), ("2+2?", "4"))))
    (tasks / "batchgen_gen.yaml").write_text(GEN_TASK.format(data=data / "gen.jsonl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENAI_"))}
    env.update(OPENAI_API_KEY=token, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [str(lm_eval), "run", "--model", "local-chat-completions",
         "--model_args", f"model=tiny-chat,base_url={api.url}/v1/chat/completions", "--apply_chat_template",
         "--tasks", "batchgen_gen", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}\n{worker.log()[-2000:]}"
    [samples_file] = out.rglob("samples_batchgen_gen_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    # Each answer is what batchgen generated for that conversation (greedy, so it can be asked again).
    for sample in samples:
        [[answer]] = sample["resps"]
        [conversation] = sample["arguments"]["gen_args_0"]["arg_0"]  # the messages it sent, as JSON
        again = api.http.post(f"{api.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-chat", "messages": json.loads(conversation), "max_tokens": 8, "temperature": 0,
            "stop": ["\n", "Q:", "Question:", "###"]})
        assert again.status_code == 200, again.text
        assert answer == again.json()["choices"][0]["message"]["content"]
