"""generation.py's batched generator on the stand-in with its adapter: left-padded batches answer exactly
as one prompt at a time, each row ends on its own (eos, stop string, max_new_tokens, cancel), streams on
its own, samples with its own seed; generate_batches and the Scheduler around it."""

from __future__ import annotations

import threading

import pytest
import torch
from generation_helpers import greedy_alone

from hunyuan_lora import generation, modeling, prompt

# Four prompt lengths, so three rows of a batch are left-padded; with these the greedy answer of one
# row, generated alone, contains the pad token's id: a penalty over a padded row would change it.
QUESTIONS = ["你是谁？", "你喜欢什么花？请详细地说一说，为什么喜欢", "一", "皇上驾到，甄嬛应该怎么回答才好呢？说说看"]
NEW = 24
GREEDY = generation.Sampling(max_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module")
def loaded(lora_run):
    loaded, tokenizer = modeling.load_for_generation(lora_run)
    model = loaded.model
    ids = [prompt.prompt_ids(tokenizer, prompt.ask(q, lora_run), False) for q in QUESTIONS]
    return model, tokenizer, ids


def _run(model, tokenizer, completions):
    """generate() in its own thread (several times faster than this one on a busy CPU)."""
    generation.generate_in_thread(model, tokenizer, completions).join()
    return completions


@pytest.fixture(scope="module")
def alone(loaded):
    """Each prompt's greedy answer by transformers' own generate, one prompt at a time, unpadded."""
    model, tokenizer, ids = loaded
    return [greedy_alone(model, tokenizer, row, NEW) for row in ids]


def test_greedy_batched_is_token_identical_to_one_at_a_time(loaded, alone):
    model, tokenizer, ids = loaded
    assert len({len(row) for row in ids}) == len(ids)  # every row but the longest is padded
    assert any(tokenizer.pad_token_id in tokens for tokens in alone)
    one_by_one = [_run(model, tokenizer, [generation.Completion(row, GREEDY)])[0] for row in ids]
    assert [c.tokens for c in one_by_one] == alone
    batch = _run(model, tokenizer, [generation.Completion(row, GREEDY) for row in ids])
    assert [c.tokens for c in batch] == alone
    assert [c.text for c in batch] == [tokenizer.decode(t, skip_special_tokens=True) for t in alone]
    in_twos = [generation.Completion(row, GREEDY) for row in ids]
    finished = list(generation.generate_batches(model, tokenizer, in_twos, batch_size=2))
    assert sorted(map(id, finished)) == sorted(map(id, in_twos))
    assert [c.tokens for c in in_twos] == alone


def test_each_row_ends_on_its_own(loaded, alone):
    model, tokenizer, ids = loaded
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in alone]
    short = generation.Completion(ids[0], generation.Sampling(max_new_tokens=5, do_sample=False))
    stop = texts[1][len(texts[1]) // 2 : len(texts[1]) // 2 + 2]
    stopped = generation.Completion(ids[1], GREEDY, stop=[stop])
    cancelled = generation.Completion(ids[2], GREEDY)
    cancelled.on_update = lambda: cancelled.cancel() if cancelled.completion_tokens >= 3 else None
    whole = generation.Completion(ids[3], GREEDY)
    before = generation.Completion(ids[0], GREEDY)
    before.cancel()
    _run(model, tokenizer, [short, stopped, cancelled, whole, before])
    assert (short.tokens, short.finish_reason) == (alone[0][:5], "length")
    assert (stopped.text, stopped.finish_reason) == (texts[1][: texts[1].index(stop)], "stop")
    assert cancelled.finish_reason == "cancelled"
    assert 3 <= cancelled.completion_tokens < NEW
    assert cancelled.tokens == alone[2][: cancelled.completion_tokens]
    assert (whole.tokens, whole.text, whole.finish_reason) == (alone[3], texts[3], "length")
    assert (before.finish_reason, before.tokens) == ("cancelled", [])


def test_an_eos_ends_its_row_with_stop(loaded, alone):
    model, tokenizer, ids = loaded
    end = next(j for j, t in enumerate(alone[1]) if j >= 2 and t not in alone[1][:j])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [alone[1][end]]  # a token of the answer, first seen there: its end
    try:
        row = _run(model, tokenizer, [generation.Completion(ids[1], GREEDY)])[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert (row.tokens, row.finish_reason) == (alone[1][: end + 1], "stop")


def test_every_row_streams_its_own_text(loaded, alone):
    model, tokenizer, ids = loaded
    rows = [generation.Completion(row, GREEDY) for row in ids]
    pieces: dict[int, list[str]] = {}

    def read(i):
        pieces[i] = list(rows[i])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(rows))]
    for r in readers:
        r.start()
    generation.generate_in_thread(model, tokenizer, rows).join()
    for r in readers:
        r.join()
    for i, c in enumerate(rows):
        assert "".join(pieces[i]) == c.text == tokenizer.decode(alone[i], skip_special_tokens=True)
    assert all(len([p for p in pieces[i] if p]) > 1 for i in pieces)


def test_a_seed_gives_the_same_sample_alone_and_in_any_batch(loaded):
    model, tokenizer, ids = loaded
    seeded = generation.Sampling(max_new_tokens=NEW, do_sample=True, temperature=1.0, top_p=1.0, seed=7)
    first = _run(model, tokenizer, [generation.Completion(ids[1], seeded)])[0]
    again = _run(model, tokenizer, [generation.Completion(ids[1], seeded)])[0]
    other_seed = generation.Sampling(max_new_tokens=NEW, do_sample=True, temperature=1.0, top_p=1.0, seed=8)
    batch = _run(
        model,
        tokenizer,
        [
            generation.Completion(ids[0], generation.Sampling(NEW, do_sample=True)),
            generation.Completion(ids[1], seeded),
            generation.Completion(ids[1], other_seed),
            generation.Completion(ids[3], GREEDY),
        ],
    )
    assert first.tokens == again.tokens == batch[1].tokens
    assert batch[2].tokens != first.tokens
    assert all(c.finish_reason in ("stop", "length") for c in batch)


def test_top_k_top_p_keep_what_transformers_keeps():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    top_k, top_p = torch.tensor([5, 0, 20]), torch.tensor([0.7, 0.9, 1.0])
    ours = generation._top_k_top_p(scores, top_k, top_p)
    for i in range(3):
        expected = scores[i : i + 1]
        if top_k[i]:
            expected = TopKLogitsWarper(int(top_k[i]))(None, expected)
        if top_p[i] < 1:
            expected = TopPLogitsWarper(float(top_p[i]))(None, expected)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(expected[0]))
        assert torch.equal(ours[i][~torch.isinf(ours[i])], expected[0][~torch.isinf(expected[0])])


def test_leaving_generate_batches_early_cancels_the_rest(loaded):
    model, tokenizer, ids = loaded
    rows = [generation.Completion(row, GREEDY) for row in ids]
    for _ in generation.generate_batches(model, tokenizer, rows, batch_size=1):
        break
    assert sum(c.finish_reason == "length" for c in rows) == 1
    assert all(c.finished for c in rows)
    assert sum(c.finish_reason == "cancelled" for c in rows) == 3


def test_the_scheduler_batches_what_waits_and_bounds_its_queue(loaded, alone):
    model, tokenizer, ids = loaded
    started, release = threading.Event(), threading.Event()
    first = generation.Completion(ids[0], GREEDY)

    def hold():  # keep the first batch running (in its generating thread) until the test says
        started.set()
        release.wait(60)

    first.on_update = hold
    scheduler = generation.Scheduler(model, tokenizer, max_batch_size=2, max_queue=2)
    try:
        scheduler.submit(first)
        assert started.wait(60)
        waiting = [generation.Completion(row, GREEDY) for row in ids[1:3]]
        for c in waiting:
            scheduler.submit(c)
        assert scheduler.load() == (1, 2)
        with pytest.raises(generation.QueueFull, match="2 requests are already waiting"):
            scheduler.submit(generation.Completion(ids[3], GREEDY))
        gone = generation.Completion(ids[3], GREEDY)
        waiting[1].cancel()  # a cancelled completion frees its place in the queue at once
        scheduler.submit(gone)
        assert scheduler.load() == (1, 2)
        release.set()
        assert first.wait(60)
        assert waiting[0].wait(60)
        assert gone.wait(60)
        assert waiting[1].wait(60)
        assert [first.tokens, waiting[0].tokens, gone.tokens] == [alone[0], alone[1], alone[3]]
        assert (waiting[1].finish_reason, waiting[1].tokens) == ("cancelled", [])
    finally:
        release.set()
        scheduler.stop(timeout=60)
    with pytest.raises(generation.QueueFull, match="shutting down"):
        scheduler.submit(generation.Completion(ids[0], GREEDY))


def test_stopping_the_scheduler_cancels_what_runs_and_waits(loaded):
    model, tokenizer, ids = loaded
    started = threading.Event()
    running = generation.Completion(ids[0], generation.Sampling(max_new_tokens=4000, do_sample=False))
    running.on_update = started.set
    scheduler = generation.Scheduler(model, tokenizer, max_batch_size=1, max_queue=4)
    scheduler.submit(running)
    assert started.wait(60)
    waiting = generation.Completion(ids[1], GREEDY)
    scheduler.submit(waiting)
    scheduler.stop(timeout=60)
    assert running.finish_reason == "cancelled"
    assert running.completion_tokens < 4000
    assert (waiting.finish_reason, waiting.tokens) == ("cancelled", [])
