"""The engine against its references: cached decode vs the full forward, absorbed vs naive attention,
batched vs alone, prefix reuse, stopping rules, the chat round trip, and clear errors for bad requests."""
import pytest
import torch

from nanok2 import ModelArgs, NanoK2Error, build_model
from nanok2.engine import Engine, absorbed_attention
from nanok2.sampling import SamplingParams
from nanok2.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=64)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(preset: str = "tiny", seed: int = 0):
    # a larger init spread than the default keeps the logits away from ties, so argmax is stable
    return build_model(ModelArgs.from_preset(preset, initializer_range=0.1), seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    # 256 byte tokens + 256 special slots = the tiny presets' vocabulary of 512
    return Tokenizer({bytes([i]): i for i in range(256)})


def tokens_of(events, n_requests=1):
    out = [[] for _ in range(n_requests)]
    for ev in events:
        if ev.token is not None:
            out[ev.request].append(ev.token)
    return out


def full_forward_greedy(model, prompt, n):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            out.append(ids[-1])
    return out


def prompt(n, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-noqlora", "tiny-grouped", "tiny-yarn"])
def test_cached_greedy_decode_matches_the_full_forward(preset):
    model = tiny_model(preset)
    p = prompt(13)
    (got,) = tokens_of(Engine(model, max_batch=2, max_seq=96).generate(p, GREEDY))
    assert got == full_forward_greedy(model, p, 64)


def test_prefill_in_chunks_matches_one_forward(model, monkeypatch):
    import nanok2.engine as engine_module
    p = prompt(40)
    (whole,) = tokens_of(Engine(model, max_seq=64).generate(p, SamplingParams(temperature=0, max_tokens=8)))
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 7)
    (chunked,) = tokens_of(Engine(model, max_seq=64).generate(p, SamplingParams(temperature=0, max_tokens=8)))
    assert chunked == whole == full_forward_greedy(model, p, 8)


def test_absorbed_attention_matches_naive(model):
    attn = model.model.layers[1].self_attn
    a = model.args
    B, T = 3, 11
    lengths = torch.tensor([11, 4, 7])
    torch.manual_seed(0)
    q_nope, q_rope = torch.randn(B, 1, a.num_attention_heads, a.qk_nope_head_dim), torch.randn(B, 1, a.num_attention_heads, a.qk_rope_head_dim)
    c_kv, k_rope = torch.randn(B, T, a.kv_lora_rank), torch.randn(B, T, a.qk_rope_head_dim)
    with torch.no_grad():
        got = absorbed_attention(q_nope[:, 0], q_rope[:, 0], c_kv, k_rope, attn.kv_b_proj.weight, lengths, attn.softmax_scale)
        for b in range(B):
            n = int(lengths[b])
            want = attn.attend(q_nope[b:b + 1], q_rope[b:b + 1], c_kv[b:b + 1, :n], k_rope[b:b + 1, :n],
                               torch.ones(1, 1, 1, n, dtype=torch.bool))
            torch.testing.assert_close(got[b:b + 1], want[:, 0], atol=1e-4, rtol=1e-4)


def test_batched_generation_matches_each_request_alone(model):
    prompts = [prompt(n, seed=n) for n in (5, 17, 9, 30, 2)]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (20, 7, 25, 12, 16)]
    alone = [tokens_of(Engine(model, max_seq=64).generate(p, sp))[0] for p, sp in zip(prompts, params)]
    # max_batch 2: requests wait, then join the running batch as others finish
    batched = tokens_of(Engine(model, max_batch=2, max_seq=64).generate(prompts, params), len(prompts))
    assert batched == alone


def test_requests_join_a_running_batch_between_steps(model):
    eng = Engine(model, max_batch=4, max_seq=64)
    a, b = prompt(6, seed=1), prompt(19, seed=2)
    ra = eng.add_request(a, SamplingParams(temperature=0, max_tokens=20))
    events = []
    for _ in range(5):
        events += eng.step()
    rb = eng.add_request(b, SamplingParams(temperature=0, max_tokens=20))
    while eng.has_work():
        events += eng.step()
    got = {r: [e.token for e in events if e.request == r] for r in (ra, rb)}
    assert got[ra] == tokens_of(Engine(model, max_seq=64).generate(a, SamplingParams(temperature=0, max_tokens=20)))[0]
    assert got[rb] == tokens_of(Engine(model, max_seq=64).generate(b, SamplingParams(temperature=0, max_tokens=20)))[0]
    assert not eng.running and sorted(eng.cache.free) == [0, 1, 2, 3]


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(model):
    p = prompt(8)
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_tokens=24)
    (alone,) = tokens_of(Engine(model, max_seq=64).generate(p, seeded))
    (again,) = tokens_of(Engine(model, max_seq=64).generate(p, seeded))
    in_batch = tokens_of(Engine(model, max_batch=3, max_seq=64).generate(
        [prompt(3, seed=5), p, prompt(12, seed=6)], [SamplingParams(temperature=1.0), seeded, GREEDY]), 3)[1]
    other_seed = tokens_of(Engine(model, max_seq=64).generate(p, SamplingParams(**{**seeded.__dict__, "seed": 99})))[0]
    assert alone == again == in_batch
    assert alone != other_seed


def test_a_shared_prefix_is_reused_and_reported(model):
    eng = Engine(model, max_batch=2, max_seq=96)
    first = prompt(20, seed=3)
    events = list(eng.generate(first, SamplingParams(temperature=0, max_tokens=10)))
    assert events[-1].usage["cached_tokens"] == 0
    # the agent's next turn: the same conversation, the model's reply, then a tool result
    reply = tokens_of(events)[0][:-1]                # the last token was produced but never fed
    second = first + reply + prompt(7, seed=4)
    calls = []
    prefill = eng._prefill
    eng._prefill = lambda slot, ids, start: calls.append((len(ids), start)) or prefill(slot, ids, start)
    events2 = list(eng.generate(second, SamplingParams(temperature=0, max_tokens=10)))
    P = len(first) + len(reply)
    assert events2[-1].usage["cached_tokens"] == P
    assert calls == [(len(second) - P, P)]          # only the new tokens were prefilled
    fresh = tokens_of(Engine(model, max_seq=96).generate(second, SamplingParams(temperature=0, max_tokens=10)))[0]
    assert tokens_of(events2)[0] == fresh


def test_a_prefix_held_by_a_running_request_is_copied(model):
    eng = Engine(model, max_batch=2, max_seq=64)
    shared = prompt(24, seed=8)
    a, b = shared + [1, 2, 3], shared + [4, 5]
    events = list(eng.generate([a, b], SamplingParams(temperature=0, max_tokens=6)))
    usage = {e.request: e.usage for e in events if e.usage}
    assert usage[0]["cached_tokens"] == 0 and usage[1]["cached_tokens"] == len(shared)
    assert tokens_of(events, 2)[1] == tokens_of(Engine(model, max_seq=64).generate(b, SamplingParams(temperature=0, max_tokens=6)))[0]


def test_stop_token_ids_max_tokens_and_max_seq(model):
    p = prompt(10)
    (free,) = tokens_of(Engine(model, max_seq=64).generate(p, SamplingParams(temperature=0, max_tokens=30)))
    stop = free[12]
    events = list(Engine(model, max_seq=64).generate(p, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop])))
    assert tokens_of(events)[0] == free[:free.index(stop) + 1] and events[-1].finish_reason == "stop"
    events = list(Engine(model, max_seq=64).generate(p, SamplingParams(temperature=0, max_tokens=5)))
    assert len(events) == 5 and events[-1].finish_reason == "length" and events[-1].usage["completion_tokens"] == 5
    # the slot is full after 16 tokens in cache: the 7th generated token cannot be fed, so it is the last
    events = list(Engine(model, max_seq=16).generate(p, SamplingParams(temperature=0, max_tokens=30)))
    assert events[-1].finish_reason == "length" and len(tokens_of(events)[0]) == 16 - len(p) + 1


def test_stop_strings_cut_the_text_and_hold_back_partial_matches(model, tokenizer):
    eng = Engine(model, tokenizer, max_seq=64)
    p = prompt(10)
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[])
    text = "".join(e.text for e in eng.generate(p, params))
    stop = text[15:18]
    events = list(eng.generate(p, SamplingParams(**{**params.__dict__, "stop": [stop]})))
    assert "".join(e.text for e in events) == text[:text.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_thinking_budget_forces_the_end_of_reasoning(model, tokenizer):
    eng = Engine(model, tokenizer, max_seq=64)
    events = list(eng.generate(prompt(10), SamplingParams(temperature=0, max_tokens=12, thinking_budget=5, stop_token_ids=[])))
    toks = tokens_of(events)[0]
    think_end = tokenizer.id_of("</think>")
    first = toks.index(think_end)
    assert first == 5 + (toks[0] == tokenizer.id_of("<think>"))
    assert "</think>" in "".join(e.text for e in events)


def test_chat_renders_generates_and_parses(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=1, max_seq=256)
    seen = []
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = eng.chat(messages, params=SamplingParams(temperature=0, max_tokens=12, thinking_budget=4), on_event=seen.append)
    assert out["role"] == "assistant" and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 12
    assert out["reasoning_content"] == "".join(e.text for e in seen if e.kind == "reasoning")
    # the next turn re-sends the conversation: its prefix is already in the cache
    messages += [{"role": "assistant", "content": out["content"] or "", "reasoning_content": out["reasoning_content"]},
                 {"role": "user", "content": "And 3+3?"}]
    out2 = eng.chat(messages, params=SamplingParams(temperature=0, max_tokens=4))
    assert out2["usage"]["cached_tokens"] > out["usage"]["prompt_tokens"] // 2


def test_bad_requests_get_clear_errors_and_do_not_stop_the_batch(model):
    eng = Engine(model, max_batch=2, max_seq=32)
    good = eng.add_request(prompt(5), SamplingParams(temperature=0, max_tokens=4))
    for bad, match in (([], "empty"), (prompt(33), "max_seq=32"), ([1, 2, 10**6], "outside the vocabulary")):
        with pytest.raises(NanoK2Error, match=match):
            eng.add_request(bad)
    with pytest.raises(NanoK2Error, match="stop strings need a tokenizer"):
        eng.add_request([1, 2], SamplingParams(stop=["x"]))
    events = []
    while eng.has_work():
        events += eng.step()
    assert [e.request for e in events] == [good] * 4 and events[-1].finish_reason == "length"
    with pytest.raises(NanoK2Error, match="before any runs|max_seq"):
        list(eng.generate([prompt(5), prompt(40)]))
    assert not eng.has_work()


def test_a_cache_that_cannot_fit_is_refused_before_allocating(model):
    with pytest.raises(NanoK2Error, match="lower max_batch or max_seq"):
        Engine(model, max_batch=10**6, max_seq=4096)


def test_cancel_and_early_exit_free_the_slots(model):
    eng = Engine(model, max_batch=2, max_seq=64)
    for ev in eng.generate([prompt(4), prompt(6)], SamplingParams(temperature=0, max_tokens=50)):
        break
    assert not eng.has_work() and sorted(eng.cache.free) == [0, 1]
    rid = eng.add_request(prompt(4))
    eng.step()
    (last,) = eng.cancel(rid)
    assert last.finish_reason == "cancelled" and not eng.has_work()


def test_cache_bytes_per_token_is_the_mla_latent(model):
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        eng = Engine(model.to(dtype), max_batch=1, max_seq=8)
        a = model.args
        assert eng.cache.bytes_per_token == a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * size
    model.float()


@pytest.mark.slow   # builds the C++ kernel (a minute or more the first time); `nanok2 bench decode` runs it too
def test_bf16_kernel_matches_torch_and_keeps_the_model_the_same():
    from nanok2.cpu_kernels import kernel, linear_bf16, use_bf16_kernel
    if kernel() is None:
        pytest.skip("no AVX2/FMA or no C++ compiler here")
    torch.manual_seed(0)
    for rows in (1, 2, 3, 5, 16, 40):
        x, w = torch.randn(rows, 64, dtype=torch.bfloat16), torch.randn(48, 64, dtype=torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), w.float())
        torch.testing.assert_close(linear_bf16(x, w).float(), want, atol=0.1, rtol=1e-2)
    from nanok2.moe import looped_experts
    model = tiny_model().to(torch.bfloat16)
    ids = torch.tensor([prompt(12)])
    moe = model.model.layers[1].mlp
    xs = [torch.randn(n, model.args.hidden_size, dtype=torch.bfloat16) for n in (6, 40)]   # one kernel call; per expert
    with torch.inference_mode():
        routes = [moe.gate(x)[:2] for x in xs]
        before = model(ids).float()
        reference = [looped_experts(moe.experts, x, idx, w).float() for x, (w, idx) in zip(xs, routes)]
        assert use_bf16_kernel(model) > 0
        after = model(ids).float()
        grouped = [moe.experts(x, idx, w).float() for x, (w, idx) in zip(xs, routes)]
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)
    for got, want in zip(grouped, reference):
        torch.testing.assert_close(got, want, atol=0.02, rtol=0.02)
    assert sorted(model.state_dict()) == sorted(tiny_model().state_dict())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer):
    from nanok2.checkpoint import save_model
    path = tmp_path_factory.mktemp("tiny")
    save_model(model, path)
    tokenizer.save(path)
    return str(path)


def test_generate_command_streams_text(checkpoint, capsys):
    from nanok2.cli import main
    assert main(["generate", "--model", checkpoint, "--prompt", "Hello", "--max-tokens", "6", "--temperature", "0",
                 "--stop", "\x00never"]) == 0
    out, err = capsys.readouterr()
    assert "[length: 5 prompt + 6 generated tokens]" in err


def test_chat_command_streams_thinking_then_the_answer(checkpoint, capsys, monkeypatch):
    from nanok2.cli import main
    lines = iter(["What is 2+2?", "And 3+3?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", checkpoint, "--max-tokens", "8", "--temperature", "0", "--thinking-budget", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.count("[thinking]") == 2 and out.count("[answer]") == 2
    turns = [line for line in err.splitlines() if line.startswith("[length:")]
    assert len(turns) == 2 and "(0 cached)" in turns[0] and "(0 cached)" not in turns[1]
