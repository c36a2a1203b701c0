"""A local transformers causal LM as a chat client (backend ``hf``), batched (module ``finegrain.llm.local``).

Requests arrive one by one from the runner's concurrent tasks; a micro-batcher gathers up to
``batch_size`` of them (waiting at most ``max_wait`` seconds for more) and generates them in one
batch with :func:`finegrain.generation.generate_texts` in a worker thread, so the event loop
stays free. The system and user messages go through the tokenizer's chat template (the system
message is folded into the user turn when the template has no system role, or when there is no
template at all). Temperature 0 means greedy decoding.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from .clients import Completion, ItemFailure


class MicroBatcher:
    """Batch single async calls into calls of ``fn(list_of_inputs) -> list_of_outputs`` in a thread."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], batch_size: int, max_wait: float = 0.05):
        self.fn, self.batch_size, self.max_wait = fn, max(1, batch_size), max_wait
        self.batches: list[int] = []  # sizes of the batches run (for inspection)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work())
        fut = loop.create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.batch_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(x, f) for x, f in batch if not f.done()]
            if not live:
                continue
            self.batches.append(len(live))
            try:
                outs = await asyncio.to_thread(self.fn, [x for x, _ in live])
            except Exception as e:  # every waiter of the batch gets the error
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), out in zip(live, outs):
                if not f.done():
                    f.set_result(out)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None


def chat_text(tokenizer, system: str, user: str) -> str:
    """The model input for a system + user exchange, generation prompt included."""
    from ..tokens import format_prompt

    if getattr(tokenizer, "chat_template", None) and system:
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": user}],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role raise (e.g. Gemma's)
            pass
    return format_prompt(tokenizer, f"{system}\n\n{user}" if system else user)


def texts_seed(texts: Sequence[str]) -> int:
    """The sampling seed of one batch of chat texts: a hash of them. The same batch draws the same answers
    again, and other batches draw independently (one fixed seed for every batch gave each batch position the
    same random stream at temperature > 0).

    >>> texts_seed(["a", "b"]) == texts_seed(["a", "b"]) != texts_seed(["a", "c"])
    True
    """
    from ..generation import hashed_seed

    return hashed_seed("\x1f".join(texts))


class HFChatClient:
    """A local causal LM (path, hub name or finegrain short name) answering chat prompts in batches."""

    name = "hf"
    remote = False
    OPTIONS = ("max_tokens", "temperature", "batch_size", "device", "dtype", "trust_remote_code")

    def __init__(self, model: str, *, max_tokens: int = 512, temperature: float | None = None, batch_size: int = 8,
                 device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False):
        import torch

        from ..models import load_model, load_tokenizer, torch_dtype, weights_fingerprint

        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature or 0.0
        # what the answers depend on besides the prompt (the runner's cache key): the weights now in a local
        # directory (a model trained again into it answers anew) and their dtype
        self.params = {"max_tokens": max_tokens, "temperature": temperature, "dtype": dtype,
                       "weights": weights_fingerprint(model)}
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.lm = load_model(model, "causal", tokenizer=self.tokenizer, trust_remote_code=trust_remote_code,
                             dtype=torch_dtype(dtype) if dtype else None).eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lm.to(self.device)
        self.batcher = MicroBatcher(self._generate, batch_size)

    def _generate(self, texts: list[str]) -> list[Completion]:
        """One batch of chat texts (each within the context, :meth:`complete` checked): their answers, with the
        token counts the decoder saw and ``truncated`` where an answer stopped at ``max_tokens`` without EOS."""
        from ..generation import sample
        from ..tokens import encode_prompts

        ids = encode_prompts(self.tokenizer, texts)
        out = sample(self.lm, self.tokenizer, ids, max_new_tokens=self.max_tokens,
                     temperature=self.temperature or 1.0, do_sample=self.temperature > 0,
                     generator_seed=texts_seed(texts))
        n_out = out.response_mask.sum(dim=1).tolist()
        return [Completion(t, len(i), int(n), truncated=not e) for t, i, n, e in
                zip(out.texts, ids, n_out, out.ended.tolist())]

    def context_length(self) -> int | None:
        cfg = self.lm.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    async def complete(self, system: str, user: str) -> Completion:
        from ..tokens import encode_texts

        text = chat_text(self.tokenizer, system, user)
        n_prompt = len(encode_texts(self.tokenizer, [text])[0])
        limit = self.context_length()
        if limit is not None and n_prompt + self.max_tokens > limit:
            raise ItemFailure("too_long", f"prompt of {n_prompt} tokens + max_tokens={self.max_tokens} exceeds the "
                                           f"model's context of {limit} tokens")
        return await self.batcher.submit(text)

    async def aclose(self) -> None:
        await self.batcher.aclose()
