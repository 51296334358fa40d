"""Ctrl-C always stops a command. Python runs a signal's handler at the next bytecode, which
may be inside an object's finaliser (`__del__`, a weakref or garbage-collection callback); a
KeyboardInterrupt raised there is printed as "Exception ignored" and dropped, and the
command ran on to its end (seen as a training that went on fitting 20,000 trees after
Ctrl-C, in one try of about twenty under load). Here the signal is made to land in a finaliser every
time, in a real process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO, hears_ctrl_c

PROGRAM = textwrap.dedent(
    """
    import os, signal, sys, time
    from loopline import cli

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, inside the finaliser
            time.sleep(0.05)

    def command():
        Finalised()  # freed at once: the interrupt is raised in __del__
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        print("ran to the end")

    cli.main = command
    sys.exit(cli.exit_code())
    """
)


def test_an_interrupt_raised_inside_a_finaliser_still_stops_the_command():
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=hears_ctrl_c
    )
    assert "ran to the end" not in done.stdout, done.stderr[-2000:]
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
