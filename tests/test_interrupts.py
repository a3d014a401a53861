"""Ctrl-C held through imports and process starts (fastrl.interrupts), then delivered."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fastrl.interrupts import ctrl_c_held

# A Ctrl-C that lands inside os.fork's hooks, as one can while AsyncVectorEnv starts its
# workers: sent from C (ctypes), so that Python first notices it in the next hook,
# logging's, which releases logging's module lock.
FORK_WITH_CTRL_C = textwrap.dedent("""
    import contextlib, ctypes, functools, os, signal, sys, threading
    # Registered before logging registers its own hooks, so that it runs before logging's.
    os.register_at_fork(after_in_parent=functools.partial(ctypes.CDLL(None).kill, os.getpid(), signal.SIGINT))
    import logging, multiprocessing
    from fastrl.envs import make_vector_env
    from fastrl.interrupts import ctrl_c_held

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    what = sys.argv[1]
    hold = ctrl_c_held() if what == "held fork" else contextlib.nullcontext()
    start = (lambda: make_vector_env("CartPole-v1", 1, "async", None, 1)) if what == "env workers" else fork
    heard = ""
    try:
        with hold:
            start()
            heard = "started"
    except KeyboardInterrupt:
        heard += ", then KeyboardInterrupt"
    other = threading.Thread(target=logging.getLogger, args=("other",), daemon=True)  # takes logging's lock
    other.start()
    other.join(5.0)
    print(heard, "| logging usable" if not other.is_alive() else "| logging locked",
          f"| {len(multiprocessing.active_children())} workers left")
""")


def start_with_ctrl_c(what: str) -> str:
    return subprocess.run([sys.executable, "-c", FORK_WITH_CTRL_C, what], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def test_a_ctrl_c_inside_a_forks_hooks_is_delivered_after_the_start_and_leaves_logging_usable():
    assert start_with_ctrl_c("held fork") == "started, then KeyboardInterrupt | logging usable | 0 workers left"
    # The hazard itself, unheld: the KeyboardInterrupt is swallowed inside the hook (the
    # Ctrl-C is lost), and logging's lock stays taken: the next fork or log call hangs.
    assert start_with_ctrl_c("plain fork") == "started | logging locked | 0 workers left"


def test_a_ctrl_c_while_env_workers_start_interrupts_after_the_start_and_ends_them():
    assert start_with_ctrl_c("env workers") == ", then KeyboardInterrupt | logging usable | 0 workers left"


def test_a_held_ctrl_c_goes_to_the_handler_that_was_there_once_the_block_ends():
    heard = []
    previous = signal.signal(signal.SIGINT, lambda *_: heard.append("handler"))
    try:
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            heard.append("block went on")
        assert heard == ["block went on", "handler"]
        assert signal.getsignal(signal.SIGINT) is not previous  # the test's handler is back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_held_ctrl_c_is_a_keyboard_interrupt_after_the_block_and_a_second_one_is_not_held():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the first")
    assert reached == ["after the first"]
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
