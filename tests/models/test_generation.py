"""Generation behaviour on the real default model: streaming, stop strings, seeds, batching, limits."""

from __future__ import annotations

import pytest

import ember
from ember import SamplingParams
from ember.errors import ContextLengthError, ParameterError
from tests.reference import assert_fused_step_equals_per_op


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    return ember.load(smollm_gguf)


def _streamed(llm, prompt, params):
    deltas = list(llm.stream(prompt, params))
    return deltas, "".join(d.text for d in deltas)


@pytest.mark.parametrize("stop", [[], ["."], [" the", "\n\n"]])
def test_stream_equals_generate(llm, stop):
    params = SamplingParams(temperature=0, max_tokens=40, stop=stop)
    whole = llm.generate("Tell me about the history of Rome.", params)[0]
    deltas, text = _streamed(llm, "Tell me about the history of Rome.", params)
    assert text == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == whole.finish_reason
    for s in stop:
        assert s not in text
    if stop:
        assert whole.finish_reason == "stop"  # these stops occur within 40 greedy tokens of this prompt


def test_chinese_streams_without_replacement_chars(llm):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompt = "请用中文介绍一下北京。北京是"
    deltas, text = _streamed(llm, prompt, params)
    # mid-stream, half characters are held back; only a character cut by max_tokens itself may end
    # the final text as U+FFFD (the truthful decode of the bytes generated)
    assert all("\ufffd" not in d.text for d in deltas[:-1])
    assert "\ufffd" not in deltas[-1].text.rstrip("\ufffd")
    assert sum("\ufffd" not in d.text and d.text == "" for d in deltas) > 0  # some deltas were held back
    assert text == llm.generate(prompt, params)[0].text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # it did write CJK characters


def test_seeded_sampling_repeats(llm):
    def sample(seed):
        return llm.generate("My favourite animal is", SamplingParams(temperature=1.0, seed=seed, max_tokens=24))[0]

    a, b = sample(1234), sample(1234)
    assert a.token_ids == b.token_ids
    others = {tuple(sample(s).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(a.token_ids)}) > 1  # seeds matter


BATCH_PROMPTS = ["The sun is", "In 1492, Columbus", "import numpy as np\n", "Roses are red,", "def fib(n):",
                 "The capital of France is", "Once upon a time", "Water boils at", "My favourite book",
                 "SELECT name FROM", "The best way to learn", "1, 1, 2, 3, 5,", "Dear Sir or Madam,",
                 "Photosynthesis is", "How do I bake bread?", "Le chat est"]


def test_batch_equals_single(llm):
    """16 different prompts generated together give exactly the tokens each gives alone (greedy)."""
    prompts = BATCH_PROMPTS
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for p, out in zip(prompts, batched, strict=True):
        assert out.token_ids == llm.generate(p, params)[0].token_ids


def test_constrained_neighbours_leave_other_rows_bit_identical(llm):
    """On the packed kernels (the head's exact candidates are re-ranked for constrained rows only): greedy and
    seeded rows beside JSON-constrained ones give exactly the tokens they give alone."""
    free = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=40, seed=3, max_tokens=24, ignore_eos=True)]
    prompts = BATCH_PROMPTS[:4]
    alone = [llm.generate(p, q)[0].token_ids for p in prompts for q in free]
    bound = SamplingParams(temperature=0.8, seed=1, max_tokens=60, structured={"json": {
        "type": "object", "properties": {"word": {"type": "string", "maxLength": 20}}, "required": ["word"]}})
    outs = llm.generate([p for p in prompts for _ in free] + prompts, [q for _ in prompts for q in free] +
                        [bound] * len(prompts))
    assert [o.token_ids for o in outs[: len(alone)]] == alone
    assert all(o.text.startswith('{"word": "') for o in outs[len(alone):])


def test_max_tokens_and_usage(llm):
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.usage.prompt_tokens == len(llm.encode("Count: 1, 2, 3,"))
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_terminators_include_end_of_turn(llm):
    im_end = llm.tokenizer.backend.token_to_id("<|im_end|>")
    assert im_end in llm.tokenizer.eos_token_ids
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64))
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_prompt_too_long_is_a_clear_error(llm):
    small = ember.load(llm.source, max_model_len=16)
    with pytest.raises(ContextLengthError, match="context"):
        small.generate("word " * 40, SamplingParams(max_tokens=4))
    with pytest.raises(ContextLengthError, match="max_tokens"):
        small.generate("hello", SamplingParams(max_tokens=100))


def test_invalid_params_name_the_field():
    with pytest.raises(ParameterError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ParameterError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ParameterError, match="logprobs"):
        SamplingParams(logprobs=100)
    with pytest.raises(ParameterError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    with pytest.raises(ParameterError, match="frobnicate"):
        SamplingParams.from_kwargs(frobnicate=1)


def test_stream_break_aborts_and_frees_blocks(llm):
    free = llm.engine.kv.num_free_blocks
    gen = llm.stream("Write a long story about dragons.", SamplingParams(max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(gen):
        if i == 3:
            break
    gen.close()
    assert llm.engine.kv.num_free_blocks == free
    assert not llm.engine.has_unfinished()


def test_logprobs(llm):
    out = llm.generate("2 + 2 =", SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 5
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[-1][1]


def test_next_chat_turn_reuses_the_cache(llm):
    """Turn 2 of a chat computes only what is new: the earlier turns' KV comes from the prefix cache."""
    params = SamplingParams(temperature=0, max_tokens=24)
    msgs = [{"role": "system", "content": "You are a concise assistant who answers in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
    first = llm.chat(msgs, params)
    first_prompt = len(first.prompt_token_ids)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = llm.chat(msgs, params)
    assert second.usage.cached_tokens >= first_prompt // 16 * 16 > 0
    assert second.usage.cached_tokens < second.usage.prompt_tokens


def test_staggered_arrivals_equal_single(llm):
    """Requests joining while others decode (steps mixing prefill and decode) still give their single output."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = BATCH_PROMPTS[4:10]
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    eng, got, ids = llm.engine, {}, []
    for p in prompts:
        ids.append(eng.add_request(llm.encode(p), params))
        for out in eng.step():  # one step between arrivals
            got.setdefault(out.request_id, []).extend(out.token_ids)
    while eng.has_unfinished():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert [got[r] for r in ids] == alone


def test_fused_decode_step_equals_per_op(llm):
    """An all-decode step runs as one C call; it must give the per-op path's numbers bit for bit (same
    logprobs, same tokens) for a batch whose sequences have different lengths."""
    from ember.quant import packed

    if not packed.available():
        pytest.skip("ember's packed kernels are not available here")
    assert_fused_step_equals_per_op(llm, BATCH_PROMPTS[:5], 12)
