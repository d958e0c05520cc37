"""deferred_interrupts: a SIGINT during the block is delivered when it ends, to the handler before it."""

import signal
import threading

import pytest

from hybridzo.interrupts import deferred_interrupts


def test_interrupt_inside_the_block_is_raised_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            done.append("after the signal")  # still runs: the interrupt waits for the block's end
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_interrupt_no_exception_and_handler_restored():
    with deferred_interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # interrupts work as usual outside a block
        signal.raise_signal(signal.SIGINT)


def test_nested_blocks_deliver_at_the_outermost_end():
    order = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            with deferred_interrupts():
                signal.raise_signal(signal.SIGINT)
            order.append("inner ended")
    assert order == ["inner ended"]


def test_user_handler_receives_the_deferred_signal():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_exception_in_block_still_delivers_the_interrupt():
    with pytest.raises(KeyboardInterrupt) as info:
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("failed write")
    assert isinstance(info.value.__context__, RuntimeError)


def test_other_threads_run_the_block_unchanged():
    errors = []

    def body():
        try:
            with deferred_interrupts():
                pass
        except BaseException as error:  # pragma: no cover - the assertion reports it
            errors.append(error)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
