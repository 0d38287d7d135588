"""Generation shared by infer, chat, eval, serve and train's before/after samples: sampling settings
and a batched generator over `model.generate` (modeling.load_for_generation loads the model to talk to).

    loaded, tokenizer = load_for_generation(cfg); model = loaded.model
    text = answer(model, tokenizer, prompt.ask("你是谁？", cfg), thinking=False, sampling=infer_sampling(cfg))

    completions = [Completion(prompt_ids(...), Sampling(max_new_tokens=256), stop=["\n\n"]), ...]
    for done in generate_batches(model, tokenizer, completions, batch_size=16):   # eval, infer
        done.text, done.finish_reason, done.completion_tokens      # each completion as it finishes

    worker = generate_in_thread(model, tokenizer, [completion])    # chat: one stream
    for piece in completion:       # text as it is generated (what a stop string needs held back is held)
        print(piece, end="")

    scheduler = Scheduler(model, tokenizer, max_batch_size=8, max_queue=64)     # serve
    scheduler.submit(completion)   # QueueFull when max_queue completions already wait

generate() is the one place that calls model.generate: the prompts left-padded into one batch, each
row with its own end (<|eos|>, a stop string, its max_new_tokens, cancel()), its own sampling settings
and seed, and its own text stream (a streamer splits each step's tokens by row). A row that has ended
is carried as padding until the batch's last row ends: model.generate takes no new rows, so what is
submitted meanwhile forms the next batch.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .config import Config
from .prompt import prompt_ids


@dataclass
class Sampling:
    max_new_tokens: int
    do_sample: bool | None = None  # None: the model folder's generation_config.json decides
    temperature: float | None = None  # None: the folder's (for sampled rows)
    top_p: float | None = None  # None: the folder's (top_k is always the folder's)
    seed: int | None = None  # a sampled row with a seed draws from its own generator: same seed, same text


def infer_sampling(cfg: Config) -> Sampling:
    return Sampling(max_new_tokens=cfg.infer.max_new_tokens, do_sample=cfg.infer.do_sample)


def answer(model, tokenizer, messages: list[dict], *, thinking: bool, sampling: Sampling) -> str:
    """The model's whole reply to the last user turn of `messages` (prompt.py builds them), generated
    in a thread of its own (on a busy CPU several times faster than the calling thread)."""
    completion = Completion(prompt_ids(tokenizer, messages, thinking), sampling)
    generate_in_thread(model, tokenizer, [completion]).join()
    if completion.error is not None:
        raise completion.error
    return completion.text


def warn_if_too_long(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """The model was not trained beyond max_position_embeddings: say so rather than answer quietly worse."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + max_new_tokens > limit:
        print(
            f"WARNING: the prompt is {prompt_tokens:,} tokens and up to {max_new_tokens:,} more may be generated, "
            f"over the model's context of {limit:,} (max_position_embeddings): the answer may degrade",
            flush=True,
        )


class Completion:
    """One prompt's answer, generated as a row of a batch: iterate for text pieces (in another thread
    than the generating one), or read text / finish_reason / completion_tokens once finished."""

    def __init__(self, ids: list[int], sampling: Sampling, stop: list[str] | tuple = ()):
        self.ids = list(ids)
        self.sampling = sampling
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []  # generated, <|eos|> included when it came
        self.text = ""  # the answer so far, cut before a stop string
        self.finish_reason: str | None = None  # stop | length | cancelled | error
        self.error: BaseException | None = None
        # Called in the generating thread after each new piece and once more when finished (serve wakes
        # its event loop with it); it must not block.
        self.on_update: Callable[[], None] | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._pieces: queue.Queue[str | None] = queue.Queue()  # None: the end
        self._sent = 0  # characters of text handed out as pieces
        self._decoded = 0  # tokens whose text is in self.text (a character split over tokens waits)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming
        self._tokenizer = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """End this row after the current token (what was generated stays in text); no-op once finished."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece
        if self.error is not None:
            raise self.error

    def pending(self) -> list[str]:
        """The pieces generated since the last call, without waiting (for a reader woken by on_update)."""
        out = []
        while True:
            try:
                piece = self._pieces.get_nowait()
            except queue.Empty:
                return out
            if piece is not None:
                out.append(piece)

    # the generating thread's side

    def _add(self, token: int, eos: set[int]) -> None:
        self.tokens.append(token)
        ended = token in eos or len(self.tokens) >= self.sampling.max_new_tokens
        tail = self._tokenizer.decode(self.tokens[self._decoded :], skip_special_tokens=True)
        if ended or not tail.endswith("\ufffd"):  # U+FFFD: the rest of a character is still to come
            self.text += tail
            self._decoded = len(self.tokens)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif token in eos:
            self._finish("stop")
        elif ended:
            self._finish("length")
        elif len(self.text) - self._hold > self._sent:
            self._pieces.put(self.text[self._sent : len(self.text) - self._hold])
            self._sent = len(self.text) - self._hold
            self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finished:
            return
        if reason != "stop" and self._tokenizer is not None and self._decoded < len(self.tokens):
            self.text += self._tokenizer.decode(self.tokens[self._decoded :], skip_special_tokens=True)
            self._decoded = len(self.tokens)
        self.finish_reason, self.error = reason, error
        if len(self.text) > self._sent:
            self._pieces.put(self.text[self._sent :])
            self._sent = len(self.text)
        self._pieces.put(None)
        self._finished.set()
        self._notify()

    def _notify(self) -> None:
        if self.on_update is not None:
            self.on_update()


def generate(model, tokenizer, completions: list[Completion], **generate_kwargs) -> None:
    """Generate the completions as one batch in this thread, returning when every row has ended.

    The one call of model.generate: engine settings (a cache implementation, compilation) are passed
    through generate_kwargs. Completions cancelled before the start are finished without running.
    An exception finishes every unfinished row with it (its readers raise it) and is raised here."""

    live = []
    for c in completions:
        c._tokenizer = tokenizer
        if c.cancelled:
            c._finish("cancelled")
        elif not c.finished:
            live.append(c)
    if not live:
        return
    width = max(c.prompt_tokens for c in live)
    input_ids = torch.full((len(live), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, c in enumerate(live):  # left padding: every row's next token lands in the same column
        input_ids[row, width - c.prompt_tokens :] = torch.tensor(c.ids)
        attention_mask[row, width - c.prompt_tokens :] = 1
        warn_if_too_long(model, c.prompt_tokens, c.sampling.max_new_tokens)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                pad_token_id=tokenizer.pad_token_id,
                max_new_tokens=max(c.sampling.max_new_tokens for c in live),
                # _RowLogits applies the penalty and each sampled row's draw: generate itself
                # only picks the highest score
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=1.0,
                logits_processor=LogitsProcessorList([_RowLogits(live, width, model.generation_config)]),
                stopping_criteria=StoppingCriteriaList([_RowsEnded(live)]),
                streamer=_RowStreamer(live, set(_eos_ids(model, tokenizer))),
                **generate_kwargs,
            )
    except BaseException as e:
        for c in live:
            c._finish("error", e)
        raise
    for c in live:  # generate's own limits (the model's max_length) end rows this module did not end
        c._finish("cancelled" if c.cancelled else "length")


def generate_in_thread(model, tokenizer, completions: list[Completion], **generate_kwargs) -> threading.Thread:
    """generate() in a daemon thread; read the completions here, join the thread before the next."""

    def work():
        with contextlib.suppress(BaseException):
            generate(model, tokenizer, completions, **generate_kwargs)

    thread = threading.Thread(target=work, daemon=True, name="generate")
    thread.start()
    return thread


def generate_batches(
    model, tokenizer, completions: list[Completion], batch_size: int, **generate_kwargs
) -> Iterator[Completion]:
    """The completions generated batch_size at a time, longest prompts first (a batch pads little, and
    the first shows the peak memory), in a thread; each is yielded as it finishes. An error is raised
    here; leaving early (Ctrl-C, an exception, break) cancels what is left."""
    finished: queue.Queue[Completion] = queue.Queue()
    for c in completions:
        c.on_update = lambda c=c: finished.put(c) if c.finished else None
    order = sorted(completions, key=lambda c: c.prompt_tokens, reverse=True)

    def work():
        try:
            for start in range(0, len(order), batch_size):
                generate(model, tokenizer, order[start : start + batch_size], **generate_kwargs)
        except BaseException as e:
            for c in order:  # the batches that never ran
                c._finish("error", e)

    worker = threading.Thread(target=work, daemon=True, name="generate-batches")
    worker.start()
    try:
        for _ in completions:
            c = finished.get()
            if c.error is not None:
                raise c.error
            yield c
    finally:
        for c in completions:
            c.cancel()
        worker.join()


class QueueFull(Exception):
    pass


class Scheduler:
    """Completions submitted from any thread, generated by one worker thread: whatever waits when the
    model is free forms the next batch (up to max_batch_size, first come first served). At most
    max_queue wait; a cancelled completion leaves the queue (or its batch) at once."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, max_queue: int, **generate_kwargs):
        self.model, self.tokenizer, self.generate_kwargs = model, tokenizer, generate_kwargs
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: collections.deque[Completion] = collections.deque()
        self._running: list[Completion] = []
        self._stopped = False
        self._changed = threading.Condition()  # held only to read or change the lists, never across generate
        self._worker = threading.Thread(target=self._work, daemon=True, name="scheduler")
        self._worker.start()

    def submit(self, completion: Completion) -> None:
        """Queue the completion; QueueFull when max_queue others wait or the scheduler has stopped."""
        with self._changed:
            for c in [c for c in self._waiting if c.cancelled]:  # their clients left: make room
                self._waiting.remove(c)
                c._finish("cancelled")
            if self._stopped:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(completion)
            self._changed.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) completions now: a finished one has been answered, though its batch may still be
        ending (generate returns after its last step)."""
        with self._changed:
            return sum(not c.finished for c in self._running), sum(not c.cancelled for c in self._waiting)

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything running or waiting and end the worker (waits up to timeout for it)."""
        with self._changed:
            self._stopped = True
            for c in (*self._waiting, *self._running):
                c.cancel()
            self._changed.notify()
        self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    break
                batch = []
                while self._waiting and len(batch) < self.max_batch_size:
                    batch.append(self._waiting.popleft())
                self._running = batch
            try:
                generate(self.model, self.tokenizer, batch, **self.generate_kwargs)
            except Exception as e:  # each completion of the batch carries it to its request; serve on
                print(f"generation failed for a batch of {len(batch)}: {type(e).__name__}: {e}", flush=True)
            with self._changed:
                self._running = []
        with self._changed:
            left, self._waiting = list(self._waiting), collections.deque()
        for c in left:
            c._finish("cancelled")


class _RowStreamer(BaseStreamer):
    """model.generate's streamer: each step's tokens, one per row, handed to the rows still going."""

    def __init__(self, rows: list[Completion], eos: set[int]):
        self.rows, self.eos, self.prompt_seen = rows, eos, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for c, token in zip(self.rows, value.tolist()):
            if not c.finished:
                c._add(int(token), self.eos)

    def end(self) -> None:
        pass


class _RowsEnded(StoppingCriteria):
    """Ends the rows that ended (eos, stop string, their max_new_tokens) or were cancelled."""

    def __init__(self, rows: list[Completion]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        for c in self.rows:
            if c.cancelled:
                c._finish("cancelled")
        return torch.tensor([c.finished for c in self.rows], dtype=torch.bool, device=input_ids.device)


class _RowLogits(LogitsProcessor):
    """The folder's repetition penalty over each row's own tokens (its left padding left out, so a row
    is penalised as it would be alone), then each sampled row's draw as transformers samples
    (temperature, top-k, top-p, a draw from the softmax) with the row's own settings and generator: the
    drawn token keeps its score and the rest of the row gets -inf, so generate's greedy pick takes it."""

    def __init__(self, rows: list[Completion], width: int, defaults):
        self.penalty = float(defaults.repetition_penalty or 1.0)
        self.padding = torch.tensor([[col < width - c.prompt_tokens for col in range(width)] for c in rows])
        self.first = torch.tensor([c.ids[0] for c in rows])  # a token of the row, in place of its padding
        settings = [_sampling_settings(c.sampling, defaults) for c in rows]
        self.sampled = [i for i, s in enumerate(settings) if s is not None]
        self.temperature = torch.tensor([settings[i][0] for i in self.sampled])
        self.top_k = torch.tensor([settings[i][1] for i in self.sampled])
        self.top_p = torch.tensor([settings[i][2] for i in self.sampled])
        self.seeds = [rows[i].sampling.seed for i in self.sampled]
        self.generators: list = []

    def __call__(self, input_ids, scores):
        device = scores.device
        if self.penalty != 1.0:  # as transformers' RepetitionPenaltyLogitsProcessor
            width = self.padding.shape[1]
            seen = input_ids.clone()
            seen[:, :width] = torch.where(self.padding.to(device), self.first.to(device)[:, None], seen[:, :width])
            score = scores.gather(1, seen)
            scores = scores.scatter(1, seen, torch.where(score < 0, score * self.penalty, score / self.penalty))
        if not self.sampled:
            return scores
        if not self.generators:
            self.generators = [
                None if seed is None else torch.Generator(device).manual_seed(seed) for seed in self.seeds
            ]
        rows = torch.tensor(self.sampled, device=device)
        warped = _top_k_top_p(
            scores[rows] / self.temperature.to(device)[:, None], self.top_k.to(device), self.top_p.to(device)
        )  # (R, V)
        probs = warped.softmax(dim=-1)
        chosen = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(self.generators)])
        scores[rows] = torch.full_like(warped, float("-inf")).scatter_(1, chosen[:, None], 0.0)
        return scores


def _sampling_settings(sampling: Sampling, defaults) -> tuple[float, int, float] | None:
    """(temperature, top_k, top_p) of a sampled row, the folder's generation_config filling what the
    request leaves open (as transformers merges them); None for a greedy row."""
    do_sample = defaults.do_sample if sampling.do_sample is None else sampling.do_sample
    if not do_sample:
        return None
    temperature = sampling.temperature if sampling.temperature is not None else defaults.temperature
    top_p = sampling.top_p if sampling.top_p is not None else defaults.top_p
    return float(temperature or 1.0), int(defaults.top_k or 0), float(1.0 if top_p is None else top_p)


def _top_k_top_p(scores, top_k, top_p):
    """transformers' TopKLogitsWarper then TopPLogitsWarper with a k and a p per row (k 0 or p 1: off):
    the best k tokens, then the fewest best of them whose probability reaches p (at least one)."""
    ranked, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    ranked = ranked.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), float("-inf"))
    probs = ranked.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs  # the mass of the better tokens
    ranked = ranked.masked_fill((top_p[:, None] < 1) & (above >= top_p[:, None]), float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter_(1, order, ranked)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids + [tokenizer.eos_token_id]
