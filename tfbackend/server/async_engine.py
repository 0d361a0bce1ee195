"""Drive the synchronous, single-threaded LLMEngine from asyncio request handlers.

One background thread owns the engine: it is the only caller of ``add_request``, ``abort_request`` and
``step``, so the engine needs no locks. Handlers talk to it through a thread-safe command queue; the thread
steps while any request is in flight and blocks on the queue when idle, so an idle server burns no CPU.
Each request's outputs travel back to its handler through an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``. A failing ``step`` fails the requests in flight, never the thread, unless
the engine has died for good (``EngineDeadError``: a rank of a multi-rank engine failed): then every request
fails, later ones are refused, the thread stops and ``on_dead`` lets the server exit. Should the thread end
anyway, everything in flight and every later submission fails at once instead of hanging.

The waiting queue is bounded (``max_queued_seqs``): a submission that would leave more sequences than that
waiting, once the batch's free slots have taken theirs, is refused with ``QueueFull`` (the server's 429), so
overload turns into fast refusals, not hour-long waits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tfbackend.engine.errors import EngineDeadError
from tfbackend.outputs import RequestOutput
from tfbackend.sampling_params import SamplingParams
from tfbackend.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from tfbackend.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

Prompt = str | list[int]
# How often an idle engine thread checks that the engine's other ranks are alive.
HEALTH_CHECK_SECONDS = 1.0


class EngineError(RuntimeError):
    """The engine failed while running a request; the request is lost but the server goes on."""


class EngineUnavailable(EngineError):
    """The engine loop has stopped (shutdown or a fatal error): nothing can run."""


class QueueFull(Exception):
    """The waiting queue holds as many sequences as allowed; the client should retry later."""


class _Sink:
    """Hands items from the engine thread to one handler's asyncio queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody is listening
            pass


@dataclass
class _Add:
    request_ids: list[str]
    prompts: list[Prompt]
    params: SamplingParams
    sink: _Sink
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Tracked:
    """Engine-thread bookkeeping for one engine request, for routing outputs and for metrics."""

    index: int  # position of the prompt in its HTTP request
    sink: _Sink
    arrival: float
    num_generated: int = 0
    last_token_time: float | None = None


class RequestStream:
    """The outputs of one HTTP request's engine requests, as ``(prompt index, cumulative RequestOutput)``.

    Use it as an async context manager: leaving the block early (client gone, handler cancelled, error)
    aborts whatever is still running so its KV blocks are freed at once.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], sink: _Sink) -> None:
        self._engine = engine
        self._sink = sink
        self._unfinished = dict.fromkeys(request_ids)

    async def wait_accepted(self) -> None:
        """Wait for the engine thread's verdict on the submission; re-raise its ValueError or EngineError."""
        try:
            verdict = await self._sink.queue.get()
        except BaseException:  # cancelled while waiting: the requests may be admitted right after
            self.abort()
            raise
        if isinstance(verdict, BaseException):
            self._unfinished.clear()  # nothing was admitted
            raise verdict

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()  # the engine thread has already dropped them
            raise item
        index, output = item
        if output.finished:
            self._unfinished.pop(output.request_id, None)
        return index, output

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.abort()

    def abort(self) -> None:
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()

    def __del__(self) -> None:
        # Safety net for a streaming response cancelled before its body generator ever started (so its
        # ``async with`` never ran): without this the request would keep generating and hold its blocks.
        self.abort()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_queued_seqs: int | None = None,
                 max_running_seqs: int = 0, on_dead: Callable[[], None] | None = None) -> None:
        """``max_queued_seqs``: most sequences waiting for admission (None: unbounded); ``max_running_seqs``:
        the engine's batch size (``max_num_seqs``), whose free slots take waiting sequences at the next step;
        ``on_dead``: called (from the engine thread) once the engine has died for good (a rank of a
        multi-rank engine failed): the requests in flight have failed, later ones fail at once."""
        self.engine = engine
        self.metrics = metrics
        self.max_queued_seqs = max_queued_seqs
        self.max_running_seqs = max_running_seqs
        self.on_dead = on_dead
        self._last_counts = (0, 0)  # (running, waiting) sequences at the last step, for a cheap early refusal
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._requests: dict[str, _Tracked] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tfbackend-engine", daemon=True)
        self._dead: EngineDeadError | None = None
        self._submit_lock = threading.Lock()  # a submission either reaches the loop or sees it dead

    # ------------------------------------------------------------------------------------ event loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the engine thread to end (without waiting): requests in flight fail, later ones are refused."""
        self._commands.put(None)

    def shutdown(self) -> None:
        """Stop the engine thread and wait for it."""
        if self._thread.is_alive():
            self.stop()
            self._thread.join()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped and self._dead is None

    def queue_is_full(self, num_seqs: int) -> bool:
        """Whether ``num_seqs`` more sequences would overflow the waiting queue, as of the last step."""
        return self._overflows(num_seqs, *self._last_counts)

    def _overflows(self, num_seqs: int, num_running: int, num_waiting: int) -> bool:
        if self.max_queued_seqs is None:
            return False
        free_slots = max(self.max_running_seqs - num_running, 0)
        return num_waiting + num_seqs - free_slots > self.max_queued_seqs

    async def generate(
        self, request_ids: Sequence[str], prompts: Sequence[Prompt], params: SamplingParams
    ) -> RequestStream:
        """Submit one engine request per prompt, all or none.

        Returns once the engine has admitted them, so a bad prompt raises ValueError here, before a
        streaming response has sent its headers.
        """
        sink = _Sink()
        stream = RequestStream(self, list(request_ids), sink)
        with self._submit_lock:
            if self._dead is not None:
                raise EngineUnavailable(f"the engine is dead: {self._dead}")
            if not self.is_alive:
                raise EngineUnavailable("the engine is not running (the server is shutting down or has failed)")
            self._commands.put(_Add(list(request_ids), list(prompts), params, sink))
        await stream.wait_accepted()
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(_Abort(request_ids))

    # -------------------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # shutdown, or a BaseException no step should raise: never leave a handler waiting
            self._stopped = True
            error = EngineUnavailable("the engine has stopped (the server is shutting down or has failed)")
            self._fail_all(error, status="aborted")
            for command in self._drain(block=False):
                if isinstance(command, _Add):
                    command.sink.put(error)

    def _loop(self) -> None:
        self._record_stats()  # /metrics shows the KV capacity before the first request
        while True:
            try:
                for command in self._drain(block=not self._requests):
                    if command is None:
                        return
                    self._handle(command)
                if self._requests:
                    self._step()
                else:
                    self._check_health()
            except EngineDeadError as exc:  # no step can run any more: fail everything and stop
                logger.error("the engine died: %s", exc)
                self._die(exc)
                return
            except Exception as exc:  # from step() or our bookkeeping: lose the requests in flight, not the loop
                logger.exception("engine loop failed; failing the %d requests in flight", len(self._requests))
                self._fail_all(EngineError(f"the engine failed while running this request: {exc}"), status="failed")
            self._record_stats()

    def _drain(self, block: bool) -> list[_Add | _Abort | None]:
        """All queued commands; waits for one when there is nothing to step, so an idle server sleeps (waking
        now and then to check that the engine's other ranks are alive)."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=HEALTH_CHECK_SECONDS))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            for request_id in command.request_ids:
                if self._requests.pop(request_id, None) is not None:
                    self._safe_abort(request_id)
                    self.metrics.request_done("aborted")
            return
        num_seqs = len(command.prompts) * command.params.n
        stats = self.engine.stats() if self.max_queued_seqs is not None else None
        if stats is not None and self._overflows(num_seqs, stats.num_running, stats.num_waiting):
            self.metrics.request_done("rejected", len(command.request_ids))
            command.sink.put(QueueFull(f"the server is at capacity ({self.max_queued_seqs} sequences waiting)"))
            return
        added: list[str] = []
        try:
            for request_id, prompt in zip(command.request_ids, command.prompts, strict=True):
                self.engine.add_request(request_id, prompt, command.params)
                added.append(request_id)
        except Exception as exc:
            for request_id in added:
                self._safe_abort(request_id)
            rejected = isinstance(exc, ValueError)  # the engine's verdict on a bad prompt or bad params
            if not rejected:
                logger.exception("add_request failed")
            self.metrics.request_done("rejected" if rejected else "failed", len(command.request_ids))
            command.sink.put(exc if rejected else EngineError(f"the engine could not add this request: {exc}"))
            return
        for index, request_id in enumerate(command.request_ids):
            self._requests[request_id] = _Tracked(index, command.sink, command.arrival)
        command.sink.put(None)  # accepted

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        for output in outputs:
            tracked = self._requests.get(output.request_id)
            if tracked is None:  # not ours any more: failed earlier and its abort_request raised
                continue
            self._observe(tracked, output, now)
            tracked.sink.put((tracked.index, output))  # a fresh object per step: safe to hand over
            if output.finished:
                del self._requests[output.request_id]
                self.metrics.request_done("finished")
                generated = sum(len(completion.token_ids) for completion in output.outputs)
                self.metrics.request_finished(now - tracked.arrival, len(output.prompt_token_ids), generated)
                for completion in output.outputs:
                    self.metrics.completion_finished(completion.finish_reason or "unknown")

    def _observe(self, tracked: _Tracked, output: RequestOutput, now: float) -> None:
        generated = sum(len(completion.token_ids) for completion in output.outputs)
        new_tokens = generated - tracked.num_generated
        if new_tokens <= 0:
            return
        if tracked.last_token_time is None:
            self.metrics.prompt_tokens(len(output.prompt_token_ids))
            self.metrics.time_to_first_token(now - tracked.arrival)
        else:
            self.metrics.inter_token_latency(now - tracked.last_token_time)
        self.metrics.generation_tokens(new_tokens)
        tracked.num_generated = generated
        tracked.last_token_time = now

    def _check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()

    def _die(self, exc: EngineDeadError) -> None:
        with self._submit_lock:
            self._dead = exc
        self._fail_all(EngineError(f"the engine died: {exc}"), status="failed")
        for command in self._drain(block=False):  # submitted before it died: answer them
            if isinstance(command, _Add):
                self.metrics.request_done("failed", len(command.request_ids))
                command.sink.put(EngineError(f"the engine died: {exc}"))
        if self.on_dead is not None:
            self.on_dead()

    def _fail_all(self, error: EngineError, status: str) -> None:
        failed = list(self._requests.items())
        self._requests.clear()
        for request_id, tracked in failed:
            self._safe_abort(request_id)
            tracked.sink.put(error)
        if failed:
            self.metrics.request_done(status, len(failed))

    def _safe_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("abort_request(%s) failed", request_id)

    def _record_stats(self) -> None:
        try:
            stats = self.engine.stats()
            self._last_counts = (stats.num_running, stats.num_waiting)
            self.metrics.engine_stats(stats)
        except Exception:
            logger.exception("engine.stats() failed")

