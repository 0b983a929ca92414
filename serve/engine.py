"""The model side of the endpoint: ``ray.serve.llm``'s ``LLMServer`` with a stream batcher that sends
the first token at once.

Every message of a streamed answer crosses two Ray hops (replica -> ingress -> proxy), so Ray Serve
LLM gathers a stream's chunks for ``stream_batching_interval_ms`` and sends each gathering as one
message. Its batcher also holds the *first* chunk for a whole interval, which adds that interval to
every request's time to first token. ``first_then_batched`` sends the first chunk alone as soon as it
exists and gathers the rest as before, so the interval can be raised for throughput without
charging it to time to first token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm.deployment import LLMServer

T = TypeVar("T")
log = logging.getLogger(__name__)
#: The private LLMServer methods LoomLLMServer relies on (ray 2.60); tests/unit/test_private_hooks.py checks them.
BATCHER_HOOKS = ("_batch_output_stream", "_get_batch_interval_ms")


async def first_then_batched(stream: AsyncIterator[T], interval_s: float) -> AsyncIterator[list[T]]:
    """``[first item]`` as soon as it arrives, then every ``interval_s`` whatever arrived meanwhile.

    The stream is read in a task of its own, so a slow consumer never stalls the engine's output; the
    last gathering is sent as soon as the stream ends (no waiting out the interval), and an error in
    the stream is raised here after the items before it.
    """
    if interval_s <= 0:  # no gathering: every chunk is a message of its own
        async for item in stream:
            yield [item]
        return
    queue: asyncio.Queue[T] = asyncio.Queue()
    arrived, finished = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
                arrived.set()
        finally:
            finished.set()
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        await arrived.wait()
        if not queue.empty():
            yield [queue.get_nowait()]
        while not (finished.is_set() and queue.empty()):
            if not finished.is_set():
                try:
                    await asyncio.wait_for(finished.wait(), timeout=interval_s)
                except TimeoutError:
                    pass
            gathered = [queue.get_nowait() for _ in range(queue.qsize())]
            if gathered:
                yield gathered
        await reader  # raises the stream's own error, if it had one
    finally:
        if not reader.done():
            reader.cancel()


if not all(hasattr(LLMServer, hook) for hook in BATCHER_HOOKS):
    log.warning(
        "ray.serve.llm's LLMServer no longer has %s: Loom's first-chunk stream batcher is inactive and streams "
        "are gathered by Ray's own batcher (time to first token grows by stream_batching_ms)",
        " / ".join(BATCHER_HOOKS),
    )


class LoomLLMServer(LLMServer):
    """``LLMServer`` whose streamed answers send their first chunk without waiting for a gathering."""

    def _batch_output_stream(self, generator: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
        # The one method Ray Serve LLM routes streamed output through (ray 2.60); interval as configured.
        return first_then_batched(generator, self._get_batch_interval_ms() / 1000)


class LocalModelCallback(CallbackBase):
    """Skips Ray Serve LLM's node initialization for a model directory: Loom serves directories on the storage
    every node reads, so there is nothing to download.

    Before each engine start, ``LLMServer`` runs a task on every node of the replica's placement group to
    download the model (``ray.llm``'s ``initialize_node``), in a fresh worker process with the replica's
    runtime environment; for a local directory that task only returns the path it was given. The context's
    ``run_init_node`` switch is Ray's own way to skip it (``LLMConfig.callback_config``). A remote source (a
    URI, as ``serve run`` may be given) is still downloaded. The hooks it relies on: :data:`CALLBACK_HOOKS`
    (tests/unit/test_private_hooks.py checks them).
    """

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and "://" not in source:
            self.ctx.run_init_node = False


#: What LocalModelCallback relies on in ray.llm (ray 2.60): the context switch and the hook it sets it in.
CALLBACK_HOOKS = ("run_init_node", "on_before_node_init")
