"""Structured outputs in the engine: the mask per row, where outputs may end, and what must not change.

A tiny random model is the hardest case for a constraint (it has no idea what JSON is), so every output
below being valid is the grammar's doing. Unconstrained neighbours must keep their exact tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import jsonschema
import pytest
import torch

import ember
from ember import SamplingParams
from ember.engine.async_engine import AsyncEngine
from ember.errors import ParameterError
from ember.structured.backend import pack, unpack
from tests.unit.test_engine import PROMPTS

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"enum": ["a", "b", "c"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        "note": {"type": ["string", "null"], "maxLength": 6},
        "items": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 2},
    },
    "required": ["id", "tag", "code", "note", "items"],
    "additionalProperties": False,
    "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                     "additionalProperties": False}},
}


@pytest.fixture(scope="module")
def llm(tiny_path):
    return ember.load(tiny_path, dtype="float32")


def sp(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(**kw)


# ---- parameters --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structured, field, words", [
    ({"json": {"type": "objekt"}}, "structured.json", "Invalid type"),
    ({"json": "{not json"}, "structured.json", "not valid JSON"),
    ({"json": {"type": "string", "pattern": "(open"}}, "structured.json", "unclosed group"),
    ({"regex": "[a-"}, "structured.regex", "invalid regex"),
    ({"grammar": "start: undefined_rule"}, "structured.grammar", "unknown name"),
    ({"grammar": 'root ::= "a" missing'}, "structured.grammar", "not found"),
    ({"choice": []}, "structured.choice", "non-empty list"),
    ({"choice": ["a", 3]}, "structured.choice", "non-empty list"),
    ({"type": "object"}, "structured", "unknown key"),
    ({"json": {}, "regex": "a"}, "structured", "exactly one"),
    ({}, "structured", "exactly one"),
    (42, "structured", "not int"),
])
def test_bad_constraints_fail_at_construction_naming_the_field(structured, field, words):
    with pytest.raises(ParameterError) as e:
        SamplingParams(structured=structured)
    assert f"SamplingParams.{field}" in str(e.value) and words in str(e.value)


def test_constraint_kinds_and_incompatible_knobs():
    from pydantic import BaseModel

    class Pet(BaseModel):
        name: str
        legs: int

    p = SamplingParams(structured=Pet)
    assert p.structured.kind == "json" and p.structured.json["required"] == ["name", "legs"]
    assert SamplingParams(structured={"json_object": True}).structured.kind == "json_object"
    for bad in ({"ignore_eos": True}, {"min_tokens": 2}):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            SamplingParams(structured={"regex": "a+"}, **bad)
    with pytest.raises(ParameterError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(ParameterError, match="logit_bias"):
        SamplingParams(logit_bias={"7": 1.0})


# ---- outputs ---------------------------------------------------------------------------------------
def test_outputs_follow_schema_regex_choice_and_grammar_even_from_a_random_model(llm):
    params = [sp(structured={"json": SCHEMA}, temperature=1.0, seed=s) for s in range(6)]
    outs = llm.generate([PROMPTS[s % 4] for s in range(6)], params)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 1  # sampling still varies inside the grammar
    regex = r"[0-9]{3}-[a-z]{2,4}"
    for o in llm.generate(PROMPTS, sp(structured={"regex": regex}, temperature=1.0, seed=3)):
        assert re.fullmatch(regex, o.text) and o.finish_reason == "stop"
    for o in llm.generate(PROMPTS, sp(structured={"choice": ["yes", "no", "the answer"]}, temperature=0)):
        assert o.text in ("yes", "no", "the answer")
    lark = 'start: "(" num ("+" num)? ")"\nnum: /[1-9][0-9]?/'
    for o in llm.generate(PROMPTS, sp(structured={"grammar": lark}, temperature=1.0, seed=5)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)", o.text) and o.finish_reason == "stop"
    gbnf = 'root ::= "<" [a-c] [a-c]? ">"'
    for o in llm.generate(PROMPTS, sp(structured={"grammar": gbnf}, temperature=1.0, seed=5)):
        assert re.fullmatch(r"<[a-c][a-c]?>", o.text) and o.finish_reason == "stop"
    obj = llm.generate(PROMPTS[0], sp(structured={"json_object": True}, temperature=0.7, seed=1, max_tokens=30))[0]
    assert obj.text.startswith("{")  # a random model rarely closes an open-ended object: SmolLM2 does, below


def test_eos_only_where_the_grammar_accepts(llm):
    backend = llm.engine.grammars
    eos = sorted(llm.tokenizer.eos_token_ids)
    con = backend.compile(SamplingParams(structured={"regex": "ab+"}).structured)

    def allowed() -> torch.Tensor:
        return unpack(backend.fill([con]), backend.vocab_size)[0]

    assert not allowed()[eos].any()  # nothing written yet: may not end
    assert con.accept(llm.tokenizer.encode("a", add_special_tokens=False)[0])
    assert not allowed()[eos].any()  # "a" is not a match yet
    assert con.accept(llm.tokenizer.encode("b", add_special_tokens=False)[0])
    ok = allowed()
    assert ok[eos].all() and ok[llm.tokenizer.encode("b", add_special_tokens=False)[0]]
    assert not ok[llm.tokenizer.encode("a", add_special_tokens=False)[0]]


def test_running_out_of_tokens_mid_structure_is_length(llm):
    out = llm.generate(PROMPTS[1], sp(structured={"json": SCHEMA}, temperature=0, max_tokens=5))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_mask_comes_before_top_k_and_logit_bias(llm):
    # top_k=1 after the mask keeps the best *allowed* token; before it, no token would survive
    free = llm.generate(PROMPTS[0], sp(temperature=0, max_tokens=1, ignore_eos=True))[0].token_ids[0]
    letters = "qxz" if llm.tokenizer.decode([free]) not in "qxz" else "jkw"
    out = llm.generate(PROMPTS[0], sp(structured={"regex": f"[{letters}]{{4}}"}, temperature=0.9, top_k=1))[0]
    assert re.fullmatch(f"[{letters}]{{4}}", out.text)
    # a +100 bias on a token the grammar forbids cannot bring it back
    q = llm.tokenizer.encode("7", add_special_tokens=False)[0]
    out = llm.generate(PROMPTS[0], sp(structured={"regex": "[a-c]{3}"}, temperature=0, logit_bias={q: 100}))[0]
    assert re.fullmatch("[a-c]{3}", out.text)


def test_logit_bias(llm):
    free = llm.generate(PROMPTS[2], sp(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids
    forced = llm.generate(PROMPTS[2], sp(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={77: 100}))[0]
    assert forced.token_ids == [77] * 6
    banned = llm.generate(PROMPTS[2], sp(temperature=0, max_tokens=6, ignore_eos=True,
                                         logit_bias={t: -100 for t in set(free)}))[0]
    assert not set(banned.token_ids) & set(free)
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        llm.generate(PROMPTS[2], sp(logit_bias={10**6: 1.0}))


def test_unconstrained_neighbours_are_bit_identical(llm):
    plain = [sp(temperature=0, max_tokens=24, ignore_eos=True),
             sp(temperature=0.8, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)]
    alone = [llm.generate([p], [q])[0] for p in PROMPTS for q in plain]
    constrained = [sp(structured={"json": SCHEMA}, temperature=t, seed=2) for t in (0.0, 1.0)]
    prompts = [p for p in PROMPTS for _ in plain] + PROMPTS[:2]
    mixed = llm.generate(prompts, [q for _ in PROMPTS for q in plain] + constrained)
    for a, m in zip(alone, mixed, strict=False):
        assert a.token_ids == m.token_ids
    for o in mixed[len(alone):]:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_preemption_prefix_reuse_chunked_prefill_and_abort_keep_constraints(tiny_path, llm):
    params = [sp(structured={"json": SCHEMA}, temperature=0.9, seed=s, max_tokens=90) for s in range(4)]
    ref = [llm.generate([p], [q])[0] for p, q in zip(PROMPTS, params, strict=True)]
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # 8 blocks: not enough for all four at once -> preemption
    small = ember.load(tiny_path, dtype="float32", kv_cache_memory=8 * per_block, max_num_batched_tokens=8,
                       max_num_seqs=4)
    seen = []
    real = small.engine.scheduler._preempt
    small.engine.scheduler._preempt = lambda req, out: (seen.append(req), real(req, out))[1]
    outs = small.generate(PROMPTS, params)
    assert seen, "the small cache was meant to force a preemption"
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    again = small.generate(PROMPTS[3], params[3])[0]  # the 30-token prompt's blocks are cached now
    assert again.usage.cached_tokens > 0 and again.token_ids == ref[3].token_ids
    stream = small.stream(PROMPTS[0], params[0])
    next(stream)
    stream.close()  # abort mid-structure
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks and not small.engine.requests


def test_masks_fill_inline_or_overlapped_alike(llm):
    params = [sp(structured={"json": SCHEMA}, temperature=1.0, seed=s) for s in range(4)]
    llm.engine.grammars.overlap = True
    try:
        overlapped = [o.token_ids for o in llm.generate(PROMPTS, params)]
    finally:
        llm.engine.grammars.overlap = False
    assert overlapped == [o.token_ids for o in llm.generate(PROMPTS, params)]


def test_slow_compiles_never_stall_running_streams(tiny_path, monkeypatch):
    """The async engine compiles on a worker thread: a stream keeps flowing while a schema compiles."""
    llm = ember.load(tiny_path, dtype="float32")
    aeng = AsyncEngine(llm.engine)
    real = llm.engine.grammars.compile
    compiling = threading.Event()

    def slow(spec):
        compiling.set()
        time.sleep(1.0)
        return real(spec)

    monkeypatch.setattr(llm.engine.grammars, "compile", slow)

    async def main() -> tuple[list[float], float]:
        stamps: list[float] = []

        async def free() -> None:
            async for _ in aeng.generate(PROMPTS[3], sp(temperature=0, max_tokens=200, ignore_eos=True)):
                stamps.append(time.monotonic())

        async def constrained() -> float:
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            async for _ in aeng.generate(PROMPTS[0], sp(structured={"regex": "[a-z]{3}"})):
                pass
            return t0

        _, t0 = await asyncio.gather(free(), constrained())
        return stamps, t0

    try:
        stamps, t0 = asyncio.run(main())
    finally:
        aeng.close()
    assert compiling.is_set()
    during = [t for t in stamps if t0 + 0.1 < t < t0 + 0.9]
    assert len(during) >= 5, "the free stream stalled while the schema compiled"


# ---- the mask in the sampler and the head ------------------------------------------------------------
def test_a_constrained_row_samples_exactly_the_masked_distribution():
    from ember.engine.sampler import Sampler, SamplingState

    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0]])  # [1, V]
    ok = torch.tensor([[True, True, True, False, False, True]])  # the model's favourite (3) is forbidden
    want = torch.softmax(logits[0].masked_fill(~ok[0], float("-inf")), -1)
    counts = torch.zeros(6)
    sampler = Sampler()
    state = SamplingState(SamplingParams(temperature=1.0, seed=0), [1], [], torch.Generator().manual_seed(0))
    allowed = (torch.tensor([0]), pack(ok))
    for _ in range(4000):
        counts[sampler(logits, [state], allowed).token_ids[0]] += 1
    assert counts[~ok[0]].sum() == 0
    assert torch.allclose(counts / counts.sum(), want, atol=0.03), (counts / counts.sum(), want)
    # top-k after the mask: the best two *allowed* tokens, never an empty set
    top2 = SamplingState(SamplingParams(temperature=1.0, top_k=2, seed=1), [1], [], torch.Generator().manual_seed(1))
    picks = {sampler(logits, [top2], allowed).token_ids[0] for _ in range(200)}
    assert picks == {0, 1}
    greedy = SamplingState(SamplingParams(temperature=0), [1], [])
    assert sampler(logits, [greedy], allowed).token_ids == [0]


def test_the_heads_exact_candidates_are_taken_among_allowed_tokens():
    from ember.layers.logits import TopRefiner

    torch.manual_seed(0)
    w, h = torch.randn(300, 8), torch.randn(2, 8)  # head rows [V, D], hidden [B, D]
    exact = h @ w.T  # [B, V]
    approx = exact + 0.05 * torch.randn_like(exact)  # what a quantized head returns
    ok = torch.zeros(1, 300, dtype=torch.bool)
    ok[0, exact[1].argsort()[:40]] = True  # row 1 may only take its 40 *worst* tokens
    refiner = TopRefiner(lambda ids: w[ids], k=16)
    plain = refiner(approx.clone(), h)
    masked = refiner(approx.clone(), h, (torch.tensor([1]), pack(ok)))
    assert torch.equal(masked[0], plain[0])  # the unconstrained row is untouched by its neighbour
    best_allowed = approx[1].masked_fill(~ok[0], float("-inf")).topk(16).indices
    assert torch.allclose(masked[1, best_allowed], exact[1, best_allowed], atol=1e-5)
    assert not torch.allclose(plain[1, best_allowed], exact[1, best_allowed], atol=1e-3)


@pytest.mark.usefixtures("cpu_backend")
def test_bitmasks_pack_unpack_and_apply_on_both_backends():
    from ember.kernels import ops

    torch.manual_seed(1)
    ok = torch.rand(3, 1000) < 0.3  # a vocabulary that is not a multiple of 32; bit 31 set in places
    ok[1] = True  # a row that allows everything (words of ~0)
    ok[2, :64] = False  # whole words of 0
    bits = pack(ok)
    assert bits.dtype == torch.int32 and bits.shape == (3, 32) and torch.equal(unpack(bits, 1000), ok)
    x = torch.randn(5, 1000)
    want = x.clone()
    rows = torch.tensor([4, 0, 2])
    for r, row in enumerate(rows.tolist()):
        want[row] = want[row].masked_fill(~ok[r], float("-inf"))
    ops.mask_rows(x, rows, bits)
    assert torch.equal(x, want)


def test_a_vocabulary_wider_than_the_logits_and_a_failed_matcher(llm, monkeypatch):
    from ember.structured.backend import GrammarBackend

    narrow = GrammarBackend(llm.tokenizer, llm.tokenizer.vocab_size - 40)  # tokenizer > logits
    con = narrow.compile(SamplingParams(structured={"regex": "[a-z]+"}).structured)
    assert narrow.fill([con]).shape == (1, (llm.tokenizer.vocab_size + 31) // 32)
    # llguidance giving up mid-output (a resource limit) ends the request as "abort", never as a clean "stop"
    rid = llm.engine.add_request(PROMPTS[0], sp(structured={"regex": "[a-z]{20}"}, temperature=0))
    monkeypatch.setattr(type(llm.engine.requests[rid].constraint), "failed", property(lambda self: True))
    outs = []
    while llm.engine.has_unfinished():
        outs += [o for o in llm.engine.step() if o.request_id == rid]
    assert outs[-1].finish_reason == "abort" and len(outs) == 1


def test_closed_tool_arguments():
    from ember.structured.spec import closed

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}}},
              "required": ["a"], "$defs": {"x": {"properties": {"y": {}}}}}
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["$defs"]["x"]["additionalProperties"] is False and "additionalProperties" not in schema
    # left open where closing would change the meaning or make it unsatisfiable
    assert "additionalProperties" not in closed({"properties": {"a": {}}, "required": ["b"]})
    assert closed({"properties": {}, "additionalProperties": {"type": "integer"}})["additionalProperties"] == {
        "type": "integer"}
    assert "additionalProperties" not in closed({"allOf": [{"properties": {"a": {}}}], "properties": {"b": {}}})
    assert "additionalProperties" not in closed({"allOf": [{"properties": {"a": {}}}]})["allOf"][0]
