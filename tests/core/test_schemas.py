import pytest
from pydantic import ValidationError

from core.schemas import GenerationParams, JobCreate, ResolvedParams, error_details


def details(payload):
    with pytest.raises(ValidationError) as err:
        JobCreate.model_validate(payload)
    return error_details(err.value)


def test_numbers_as_strings_and_booleans_are_type_errors_not_coerced():
    problems = details({"model": "m", "prompts": ["a"], "params": {"max_new_tokens": "32", "top_k": True}})
    assert {p["loc"] for p in problems} == {"params.max_new_tokens", "params.top_k"}


def test_every_problem_is_reported_with_its_request_index():
    problems = details({"model": "m", "requests": [
        {"prompt": "ok"}, {"prompt": ""}, {"messages": [{"role": "assistant", "content": "x"}]},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": "x", "params": {"temperature": 9}},
    ]})
    locs = [p["loc"] for p in problems]
    assert locs == ["requests[1].prompt", "requests[2]", "requests[3]", "requests[4].params.temperature"]


def test_exactly_one_of_prompts_or_requests():
    assert details({"model": "m"})[0]["message"] == "give exactly one of 'prompts' or 'requests'"
    assert details({"model": "m", "prompts": ["a"], "requests": [{"prompt": "b"}]})[0]["message"] == \
        "give exactly one of 'prompts' or 'requests'"


def test_unknown_fields_are_errors():
    assert details({"model": "m", "prompts": ["a"], "params": {"max_tokens": 5}})[0]["loc"] == "params.max_tokens"


def test_params_resolve_in_layers():
    p = ResolvedParams.resolve({"temperature": 0.6, "max_new_tokens": 256},
                               GenerationParams(max_new_tokens=32, stop=["\n"]),
                               GenerationParams(temperature=0.0))
    assert (p.temperature, p.max_new_tokens, p.stop, p.top_p) == (0.0, 32, ("\n",), 1.0)
    assert p.sampling_key() != ResolvedParams.resolve({"temperature": 0.7}).sampling_key()


def test_stop_strings_are_bounded():
    assert GenerationParams(stop=["a"] * 16).stop == ["a"] * 16  # lm-eval sends more than OpenAI's 4
    with pytest.raises(ValidationError):
        GenerationParams(stop=["a"] * 17)
    with pytest.raises(ValidationError):
        GenerationParams(stop=[""])
