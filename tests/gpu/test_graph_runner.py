"""Decode replayed from per-bucket graphs (here the eager stand-in, with the Triton kernels in the
interpreter): padded buckets give the same tokens as the plain path, padding rows touch no cache slot, a
batch over the largest bucket runs eagerly, prompt steps never use a graph."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from ember.engine.graph_runner import DecodeGraphs, EagerGraph
from tests.models.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf", arch="llama")


def _with_graphs(llm, max_batch: int) -> DecodeGraphs:
    e = llm.engine
    g = DecodeGraphs(e.model, e.kv, e.runner.device, max_batch, e.max_model_len, make_graph=EagerGraph)
    e.runner.graphs = g
    return g


def test_buckets():
    g = DecodeGraphs.__new__(DecodeGraphs)
    g.buckets, g.max_batch = [1, 2, 4, 8, 16, 32, 48], 48
    assert [g.bucket(n) for n in (1, 3, 5, 17, 48, 49)] == [1, 4, 8, 32, 48, None]


def test_padded_buckets_match_the_plain_path(path):
    ref = ember.load(path, dtype="float32", attention="torch")
    llm = ember.load(path, dtype="float32", attention="triton")
    g = _with_graphs(llm, max_batch=4)
    for kc, vc in zip(llm.engine.kv.k, llm.engine.kv.v, strict=True):
        kc.zero_()
        vc.zero_()
    prompts = [[5, 17, 200, 33], [90, 12, 255, 1, 64, 100, 7], [40, 41]]
    # different lengths: the batch shrinks 3 -> 2 -> 1 while decoding (buckets 4, 2, 1)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in (9, 6, 3)]
    want = ref.generate(prompts, params)
    got = llm.generate(prompts, params)
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        # the runner-up logprobs (~ -10: the tiny model is sure of its tokens) show any change in the logits
        torch.testing.assert_close([t[1] for p in a.logprobs for t in p.top], [t[1] for p in b.logprobs for t in p.top],
                                   atol=1e-4, rtol=0)
    assert sorted(g.graphs) == [1, 2, 4]
    # bucket 4 ran with a padding row (slot -1): the cache's last slot, where a wrapped -1 would land, is clean
    assert all(not kc[:, -1].any() for kc in llm.engine.kv.k)


def test_over_the_largest_bucket_runs_eagerly(path):
    ref = ember.load(path, dtype="float32", attention="torch")
    llm = ember.load(path, dtype="float32", attention="triton")
    g = _with_graphs(llm, max_batch=2)
    g.capture_all()  # as the engine does on a GPU: on padding rows only, which must leave no trace
    assert sorted(g.graphs) == [1, 2] and (g.slots == -1).all() and not g.ctx_lens.any()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 3, 6, 4)]
    want = [o.token_ids for o in ref.generate(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert sorted(g.graphs) == [1, 2]  # 4 and 3 running: eager; 2 and 1 at the end: the captured graphs


def test_padding_rows_do_not_write_stale_slots(path):
    """4 rows then 3 in bucket 4: the 4th row's slot from the first step must not be written by the padding row."""
    llm = ember.load(path, dtype="float32", attention="triton")
    e = llm.engine
    g = _with_graphs(llm, max_batch=4)
    tables = [[0], [1], [2], [3]]
    slots = [5, 16 + 5, 32 + 5, 48 + 5]
    g.run([7, 8, 9, 10], [5, 5, 5, 5], slots, tables)
    for kc in e.kv.k:
        kc[:, 48 + 5] = 123.0
    g.run([7, 8, 9], [5, 5, 5], slots[:3], tables[:3])
    assert all((kc[:, 48 + 5] == 123.0).all() for kc in e.kv.k)
    assert g.slots[3] == -1 and g.ctx_lens[3] == 0 and g.ctx_lens[:3].tolist() == [6, 6, 6]


def test_graphs_only_on_cuda_and_switchable(monkeypatch):
    from ember.engine.graph_runner import graphs_enabled

    assert not graphs_enabled(torch.device("cpu"))
    assert graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv("EMBER_CUDA_GRAPHS", "0")
    assert not graphs_enabled(torch.device("cuda"))
