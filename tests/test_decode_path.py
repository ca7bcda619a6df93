"""The decode fast path on the real model (fp32, CPU): graph buckets and padding, block tables
kept on the device and synced incrementally, seeded draws across a handoff, one bad request in
a batch, incremental stop strings, logprobs."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.cuda_graphs import bucket_for, graph_batch_sizes
from tandem.engine.sampling_params import SamplingParams

from .conftest import greedy, run_to_completion

TEXTS = ["The river ran past the old mill and", "Write a short poem about the sea:",
         "List three prime numbers:", "Q: What is the boiling point of water?\nA:",
         "Once upon a time, in a small village at the edge of a great forest,"]


@pytest.fixture(scope="module")
def prompts(loaded_fp32) -> list[list[int]]:
    return [loaded_fp32.tokenizer.encode(t) for t in TEXTS]


def test_buckets_are_powers_of_two_to_eight_then_every_eight():
    assert graph_batch_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert graph_batch_sizes(60)[-2:] == [56, 64]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 4]
    assert graph_batch_sizes(2000)[-1] == 512
    sizes = graph_batch_sizes(64)
    assert [bucket_for(sizes, n) for n in (1, 3, 5, 9, 64, 65)] == [1, 4, 8, 16, 64, None]


def test_padded_decode_steps_give_the_unpadded_tokens(make_engine, prompts):
    plain = run_to_completion(make_engine(), prompts[:3], greedy(12))
    engine = make_engine()
    engine.runner.pad_to_buckets = True  # 3 sequences run as 4, the 4th decodes padding
    assert run_to_completion(engine, prompts[:3], greedy(12)) == plain
    block = engine.runner.decode_inputs.scratch_slot // engine.config.block_size
    scratch = engine.cache.data[:, :, block]
    assert scratch.abs().sum() > 0  # padding wrote its K/V there, not into a request's block
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_block_tables_upload_only_new_blocks(make_engine, prompts):
    engine = make_engine()
    long_prompt = (prompts[4] * 12)[:300]  # 19 blocks of 16
    engine.add_request("a", long_prompt, greedy(40))
    engine.step()  # prefill (eager)
    inputs = engine.runner.decode_inputs
    before = inputs.num_table_entries_uploaded
    engine.step()  # first decode: the whole table once
    assert inputs.num_table_entries_uploaded - before == len(engine.seqs["a"].block_table)
    before = inputs.num_table_entries_uploaded
    for _ in range(30):  # positions 301..330 cross into 2 new blocks
        engine.step()
    assert inputs.num_table_entries_uploaded - before == 2
    seq = engine.seqs["a"]
    row = inputs._rows[seq]
    assert inputs.block_tables[row, :len(seq.block_table)].tolist() == seq.block_table


def test_preempted_sequences_decode_correctly_after_their_table_changed(make_engine, prompts):
    reference = run_to_completion(make_engine(), prompts, greedy(24))
    engine = make_engine(num_kv_blocks=12, block_size=8)  # preemptions happen
    assert run_to_completion(engine, prompts, greedy(24)) == reference
    assert engine.stats().num_preemptions > 0


def test_seeded_draws_continue_identically_after_a_handoff(make_engine, prompts):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=123,
                            ignore_eos=True)
    whole = run_to_completion(make_engine(), [prompts[1]], params)[0]
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("p", prompts[1], params, prefill_only=True)
    first = []
    while not first:
        first = prefill.step()
    decode.import_request("d", prompts[1], first[0].token_ids, params, prefill.export_kv("p"))
    got = None
    while got is None:
        got = next((o.token_ids for o in decode.step() if o.finished), None)
    assert got == whole


def test_one_failing_request_leaves_the_batch_running(make_engine, prompts, monkeypatch):
    engine = make_engine()
    sample = engine.sampler.sample

    def poison_second_row(logits, inputs):
        if logits.shape[0] == 3:
            logits = logits.clone()
            logits[1] = float("nan")
        return sample(logits, inputs)

    monkeypatch.setattr(engine.sampler, "sample", poison_second_row)
    wild = [SamplingParams(max_tokens=8, temperature=1e-39, ignore_eos=True),
            SamplingParams(max_tokens=8, seed=1, ignore_eos=True),
            SamplingParams(max_tokens=8, top_k=10**9, seed=2, ignore_eos=True)]
    for i, (prompt, p) in enumerate(zip(prompts[:3], wild, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done["r1"].finish_reason == "error" and "non-finite" in done["r1"].error
    assert [len(done[r].token_ids) for r in ("r0", "r2")] == [8, 8]
    assert done["r0"].finish_reason == done["r2"].finish_reason == "length"
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_stop_strings_are_searched_in_the_new_text_only(make_engine, prompts, monkeypatch):
    engine = make_engine()
    tokenizer = engine.tokenizer
    decoded_lengths: list[int] = []
    decode = tokenizer.decode

    def counting(ids, *args, **kwargs):
        decoded_lengths.append(len(ids))
        return decode(ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counting)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop=["never-seen"])
    run_to_completion(engine, [prompts[0]], params)
    during = decoded_lengths[:-1]  # the last decode builds the final text
    assert len(during) >= 47 and max(during) <= 3


def test_logprobs_equal_the_engines_own_scores(make_engine, prompts):
    engine = make_engine()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    engine.add_request("a", prompts[2], params)
    out = None
    while out is None:
        out = next((o for o in engine.step() if o.finished), None)
    scores = engine.score(prompts[2] + out.token_ids).log_softmax(-1)
    rows = scores[len(prompts[2]) - 1:-1]
    for token, entry, row in zip(out.token_ids, out.logprobs, rows, strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry.top[0][0] == token == int(row.argmax())
        assert len(entry.top) == 2
    assert torch.isfinite(scores).all()
