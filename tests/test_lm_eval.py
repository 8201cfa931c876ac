"""lm-eval 0.4.13's `local-completions` against the demo server (the Makefile's DEMO_ARGS): `loglikelihood`,
`loglikelihood_rolling` and a multiple-choice passkey task from a local YAML + JSONL (no downloads). The model
must prefer the right pass key, and every value must equal the offline engine's prompt log-probabilities of the
same tokens. Skipped only when lm-eval cannot be imported (the `eval` extra, installed by `make venv`)."""
from __future__ import annotations

import json
import os
import random

import pytest

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

lm_eval = pytest.importorskip("lm_eval")

import tests.test_demo_serving as demo_serving  # noqa: E402
from longserve.bench.demo_prompts import chat_prompt, passkey_sample, random_digits  # noqa: E402

ROOT = demo_serving.ROOT
demo_server = demo_serving.demo_server  # the demo server fixture, shared by name (module scope: one server here)

MODEL = ROOT / "models" / "demo-passkey"


def _api(srv, config):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    return LocalCompletionsAPI(base_url=srv.stack.http_url + "/v1/completions", model=config.served_model_name,
                               tokenizer_backend="huggingface", tokenizer=str(MODEL), num_concurrent=1,
                               max_retries=1, max_length=config.max_model_len, tokenized_requests=True)


@pytest.fixture(scope="module")
def offline():
    from longserve.server.engine import LLM, SamplingParams
    llm = LLM(str(MODEL), max_model_len=16384, prefill_chunk_tokens=2048, kv_capacity_tokens=65536)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)

    def score(ids: list[int], start: int) -> float:
        """Sum of the offline engine's log-probabilities of tokens ids[start:] given what precedes them."""
        entries = llm.generate([ids], params)[0].prompt_logprobs
        return sum(e.logprob for e in entries[start:])
    return score


def _samples(n: int, seed: int = 7) -> list[dict]:
    """Passkey prompts (the demo's training format, ~300 tokens) with the right key and three decoys."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        key = random_digits(rng, 5)
        sample = passkey_sample(40, rng.random(), key, "varied", rng)
        decoys = set()
        while len(decoys) < 3:
            decoys.add(random_digits(rng, 5))
        choices = [f"The pass key is {k}." for k in [key, *sorted(decoys - {key})][:4]]
        label = i % len(choices)
        choices[0], choices[label] = choices[label], choices[0]
        docs.append({"context": chat_prompt(sample.prompt), "choices": choices, "label": label})
    return docs


def _pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """lm-eval's split: the whole string's tokens, and where the continuation starts. Like lm-eval, trailing
    whitespace of the context moves to the continuation (the chat prompt's final newline is scored)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return whole, len(ctx)


def test_loglikelihood_and_rolling_equal_the_offline_engine(demo_server, offline):
    from lm_eval.api.instance import Instance

    srv, config = demo_server
    lm = _api(srv, config)
    doc = _samples(1, seed=3)[0]
    requests = [Instance("loglikelihood", {}, (doc["context"], c), i) for i, c in enumerate(doc["choices"])]
    results = lm.loglikelihood(requests)
    for (context, continuation), (ll, _greedy) in zip([r.args for r in requests], results):
        whole, start = _pair(lm.tokenizer, context, continuation)
        assert ll == pytest.approx(offline(whole, start), abs=1e-4)
    best = max(range(len(results)), key=lambda i: results[i][0])
    assert best == doc["label"]                                 # the right pass key is the likeliest
    assert results[doc["label"]][1] is True                     # and greedy decoding would produce it

    text = doc["context"] + doc["choices"][doc["label"]]
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    # one window (shorter than max_length): every token, the first one conditioned on the end-of-text token
    assert rolling == pytest.approx(offline([lm.tokenizer.eos_token_id, *ids], 1), abs=1e-4)


def test_multiple_choice_task_from_local_files_prefers_the_right_passkey(demo_server, offline, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    srv, config = demo_server
    docs = _samples(4)
    data = tmp_path / "passkey.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "passkey_mc.yaml").write_text(f"""task: longserve_passkey_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    out = simple_evaluate(model=_api(srv, config), tasks=["longserve_passkey_mc"],
                          task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                          cache_requests=False)
    assert out["results"]["longserve_passkey_mc"]["acc,none"] == 1.0
    tokenizer = _api(srv, config).tokenizer
    for sample in out["samples"]["longserve_passkey_mc"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            whole, start = _pair(tokenizer, doc["context"], choice)
            assert float(resp[0][0]) == pytest.approx(offline(whole, start), abs=1e-4)
