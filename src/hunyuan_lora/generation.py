"""Generation shared by infer, chat, eval and serve: sampling settings, and one streaming generator
that stops at <|eos|>, a stop string, max_new_tokens or when asked to (modeling.load_for_generation
loads the model to talk to).

    loaded, tokenizer = load_for_generation(cfg); model = loaded.model
    text = answer(model, tokenizer, prompt.ask("你是谁？", cfg), thinking=False, sampling=infer_sampling(cfg))
    gen = Generation(model, tokenizer, prompt_ids(...), Sampling(max_new_tokens=256), stop=["\n\n"])
    for piece in gen:            # text as it is generated (what a stop string needs held back is held)
        print(piece, end="")
    gen.text, gen.finish_reason, gen.completion_tokens

`model.generate` runs in a thread and hands text over through transformers' TextIteratorStreamer;
cancel() (Ctrl-C in chat, a client gone in serve) ends it after the current token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .config import Config
from .prompt import prompt_ids


@dataclass
class Sampling:
    max_new_tokens: int
    do_sample: bool | None = None  # None: the model folder's generation_config.json decides
    temperature: float | None = None
    top_p: float | None = None

    def kwargs(self) -> dict:
        out: dict = {"max_new_tokens": self.max_new_tokens}
        if self.do_sample is False:  # greedy: the folder's sampling settings do not apply
            return out | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.do_sample:
            out["do_sample"] = True
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        return out


def infer_sampling(cfg: Config) -> Sampling:
    return Sampling(max_new_tokens=cfg.infer.max_new_tokens, do_sample=cfg.infer.do_sample)


def answer(model, tokenizer, messages: list[dict], *, thinking: bool, sampling: Sampling) -> str:
    """The model's whole reply to the last user turn of `messages` (prompt.py builds them), generated
    by a Generation (its own thread: on a busy CPU several times faster than the calling thread)."""
    return Generation(model, tokenizer, prompt_ids(tokenizer, messages, thinking), sampling).complete().text


def reply(model, tokenizer, messages: list[dict], *, thinking: bool, sampling: Sampling) -> str:
    """As answer(), generated in the calling thread (training callbacks, where generate must run on
    the process's own thread)."""
    import torch

    ids = prompt_ids(tokenizer, messages, thinking)
    warn_if_too_long(model, len(ids), sampling.max_new_tokens)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pad_token_id=tokenizer.pad_token_id, **sampling.kwargs())
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def warn_if_too_long(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """The model was not trained beyond max_position_embeddings: say so rather than answer quietly worse."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + max_new_tokens > limit:
        print(f"WARNING: the prompt is {prompt_tokens:,} tokens and up to {max_new_tokens:,} more may be generated, "
              f"over the model's context of {limit:,} (max_position_embeddings): the answer may degrade", flush=True)


class Generation:
    """One answer being generated; iterate for text pieces, then read text / finish_reason."""

    def __init__(self, model, tokenizer, ids: list[int], sampling: Sampling, stop: list[str] | tuple = ()):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        self._cancel = threading.Event()
        cancel = self._cancel

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        self.prompt_tokens = len(ids)
        warn_if_too_long(model, len(ids), sampling.max_new_tokens)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.finish_reason: str | None = None  # stop | length | cancelled
        self._sampling = sampling
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._eos = set(_eos_ids(model, tokenizer))
        self._output = None
        self._error: BaseException | None = None
        input_ids = torch.tensor([ids], device=model.device)

        def work():
            try:
                with torch.no_grad():
                    self._output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                  streamer=self._streamer,
                                                  stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                                                  pad_token_id=tokenizer.pad_token_id, **sampling.kwargs())
            except BaseException as e:  # handed to the reading thread, which raises it
                self._error = e
                self._streamer.end()

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop after the current token and wait for generate to return (what was streamed stays in text)."""
        self._cancel.set()
        for _ in self._streamer:
            pass
        self._thread.join()

    def __iter__(self):
        hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming
        sent = 0
        for piece in self._streamer:
            self.text += piece
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                self.cancel()
                break
            if len(self.text) - hold > sent:
                yield self.text[sent:len(self.text) - hold]
                sent = len(self.text) - hold
        self._thread.join()
        if self._error is not None:
            raise self._error
        if len(self.text) > sent:
            yield self.text[sent:]
        if self.finish_reason is None:
            new = self._output[0, self.prompt_tokens:].tolist() if self._output is not None else []
            if self._cancel.is_set():
                self.finish_reason = "cancelled"
            elif new and new[-1] in self._eos:
                self.finish_reason = "stop"
            else:
                self.finish_reason = "length"

    def complete(self) -> Generation:
        """Generate to the end without streaming; text and finish_reason are then set."""
        for _ in self:
            pass
        return self

    @property
    def completion_tokens(self) -> int:
        return 0 if self._output is None else int(self._output.shape[1]) - self.prompt_tokens


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids + [tokenizer.eos_token_id]
