"""The engine-to-event-loop mailbox: calls from another thread run on the loop, in order, and a burst of
them wakes the loop once (not once per call)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from scalelab.serve.mailbox import mailbox


def test_a_burst_of_calls_runs_in_order_on_the_loop_after_one_wakeup() -> None:
    async def main() -> tuple[list[tuple[bool, int]], int]:
        loop = asyncio.get_running_loop()
        box = mailbox(loop)
        assert mailbox(loop) is box
        loop_thread = threading.get_ident()
        got: list[tuple[bool, int]] = []
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        finished = asyncio.Event()

        def engine() -> None:
            for i in range(100):
                box.call(lambda i=i: got.append((threading.get_ident() == loop_thread, i)))
            box.call(finished.set)

        worker = threading.Thread(target=engine)
        worker.start()
        worker.join()  # the loop is blocked meanwhile, as it may be while an engine step finishes requests
        await asyncio.wait_for(finished.wait(), 10)
        # a later call, after the loop drained the first burst, wakes it again
        late = threading.Thread(target=lambda: box.call(lambda: got.append((True, 100))))
        late.start()
        late.join()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return got, wakeups

    got, wakeups = asyncio.run(main())
    assert got == [(True, i) for i in range(101)]
    assert wakeups == 2


def test_a_failing_call_does_not_drop_the_next_ones() -> None:
    async def main() -> list[int]:
        box = mailbox(asyncio.get_running_loop())
        got: list[int] = []
        done = asyncio.Event()

        def calls() -> None:
            box.call(got.append, 1)
            box.call(lambda: 1 / 0)
            box.call(got.append, 2)
            box.call(done.set)

        threading.Thread(target=calls).start()
        await asyncio.wait_for(done.wait(), 10)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_a_finished_event_loop_is_not_kept_alive_by_its_mailbox() -> None:
    import gc
    import weakref

    async def main() -> weakref.ref[asyncio.AbstractEventLoop]:
        loop = asyncio.get_running_loop()
        mailbox(loop).call(lambda: None)
        await asyncio.sleep(0)
        return weakref.ref(loop)

    ref = asyncio.run(main())
    gc.collect()
    assert ref() is None
