"""The official openai client (sync and async) against the real HTTP app around the fake engine."""
from __future__ import annotations

import asyncio

import httpx
import openai

MSG = [{"role": "user", "content": "Tell me something."}]


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.stack.http_url + "/v1", api_key="unused", max_retries=0, **kwargs)


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.stack.http_url + "/v1", api_key="unused", max_retries=0)


def test_models_list_reports_max_model_len(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    card = models.data[0].model_dump()
    assert card["max_model_len"] == 4096
    assert card["owned_by"] == "longserve" and card["root"] == "/models/fake"


def test_chat_completion_usage_and_shape(server, engine):
    r = client(server).chat.completions.create(model="fake-model", messages=MSG, max_tokens=7, seed=3)
    prompt = engine.apply_chat_template(MSG)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content) == 7          # one character per fake token
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == len(prompt) + 7


def test_completion_defaults_max_tokens_to_engine_cap(server):
    r = client(server).completions.create(model="fake-model", prompt="abc")
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 512 and r.choices[0].finish_reason == "length"   # min(C, L - P)


def test_n2_choices_are_independent_and_seeded(server):
    c = client(server)
    a = c.chat.completions.create(model="fake-model", messages=MSG, max_tokens=12, n=2, seed=7)
    b = c.chat.completions.create(model="fake-model", messages=MSG, max_tokens=12, n=2, seed=7)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert a.choices[0].message.content != a.choices[1].message.content
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert a.usage.completion_tokens == 24


def test_seed_reproducibility_and_variation(server):
    c = client(server)
    texts = [c.completions.create(model="fake-model", prompt="x", max_tokens=16, seed=s).choices[0].text
             for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


def test_stop_string_ends_generation(server):
    c = client(server)
    free = c.completions.create(model="fake-model", prompt="p", max_tokens=40, seed=5).choices[0].text
    stop = free[10:12]
    r = c.completions.create(model="fake-model", prompt="p", max_tokens=40, seed=5, stop=[stop])
    cut = free.index(stop)
    assert r.choices[0].text == free[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.model_dump()["choices"][0]["stop_reason"] == stop
    kept = c.completions.create(model="fake-model", prompt="p", max_tokens=40, seed=5, stop=stop,
                                extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == free[:cut] + stop


def test_logprobs_chat_and_completion(server):
    c = client(server)
    r = c.chat.completions.create(model="fake-model", messages=MSG, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    comp = c.completions.create(model="fake-model", prompt="ab", max_tokens=5, logprobs=2)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset == list(range(5)) and all(len(t) == 2 for t in lp.top_logprobs)


def test_streaming_chat_with_usage_chunk(server):
    stream = client(server).chat.completions.create(model="fake-model", messages=MSG, max_tokens=9, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert len(text) == 9
    finals = [ch.choices[0].finish_reason for ch in chunks[:-1]]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}


def test_streaming_completion_echo_and_multi_prompt(server):
    r = client(server).completions.create(model="fake-model", prompt=["ab", "cde"], max_tokens=3, echo=True, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("ab") and r.choices[2].text.startswith("cde")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    ids = client(server).completions.create(model="fake-model", prompt=[104, 105], max_tokens=2, echo=True)
    assert ids.choices[0].text.startswith("hi")


def test_async_client_streaming_and_continuous_usage(server):
    async def main():
        c = aclient(server)
        stream = await c.completions.create(model="fake-model", prompt="hello", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True,
                                                            "continuous_usage_stats": True})
        chunks = [ch async for ch in stream]
        plain = await c.chat.completions.create(model="fake-model", messages=MSG, max_tokens=3)
        await c.close()
        return chunks, plain
    chunks, plain = asyncio.run(main())
    assert [ch.usage.completion_tokens for ch in chunks if ch.choices] == [1, 2, 3, 4, 5]
    assert chunks[-1].usage.total_tokens == 10
    assert plain.usage.completion_tokens == 3


def test_32_concurrent_streams_have_correct_usage(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, token_delay=0.002)
    srv = server_factory(config, engine)

    async def one(c, i):
        stream = await c.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "q" * (i + 1)}], max_tokens=4 + i % 5,
            stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
            usage = ch.usage or usage
        return i, text, usage

    async def main():
        c = aclient(srv)
        results = await asyncio.gather(*(one(c, i) for i in range(32)))
        await c.close()
        return results
    for i, text, usage in asyncio.run(main()):
        assert usage.completion_tokens == 4 + i % 5 == len(text)
        assert usage.prompt_tokens == len(engine.apply_chat_template([{"role": "user", "content": "q" * (i + 1)}]))
    assert engine.load_stats().kv_blocks_used == 0


def test_tokenize_detokenize_version(server, engine):
    base = server.stack.http_url
    t = httpx.post(base + "/tokenize", json={"prompt": "hey", "return_token_strs": True}).json()
    assert t == {"count": 3, "max_model_len": 4096, "tokens": [104, 101, 121], "token_strs": ["h", "e", "y"]}
    chat = httpx.post(base + "/tokenize", json={"messages": MSG}).json()
    assert chat["count"] == len(engine.apply_chat_template(MSG))
    assert httpx.post(base + "/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert httpx.get(base + "/version").json()["version"]


def test_unknown_fields_are_accepted(server):
    r = httpx.post(server.stack.http_url + "/v1/completions",
                   json={"prompt": "a", "max_tokens": 2, "no_such_field": 1, "user": "u", "top_k": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_generation_config_defaults_apply(tmp_path, server_factory, config_factory, fake_engine_cls):
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.0, "top_k": 20}')
    cfg = config_factory(model_path=str(tmp_path))
    srv = server_factory(cfg, fake_engine_cls(cfg))
    c = client(srv)
    texts = {c.completions.create(model="fake-model", prompt="same", max_tokens=8).choices[0].text for _ in range(3)}
    assert len(texts) == 1   # temperature 0 from generation_config.json => greedy, no seed needed


def test_truncate_prompt_tokens_and_max_completion_tokens(server):
    c = client(server)
    r = c.completions.create(model="fake-model", prompt="abcdefgh", max_tokens=2,
                             extra_body={"truncate_prompt_tokens": 3})
    assert r.usage.prompt_tokens == 3
    chat = c.chat.completions.create(model="fake-model", messages=MSG, max_tokens=50, max_completion_tokens=4)
    assert chat.usage.completion_tokens == 4              # max_completion_tokens wins over max_tokens
