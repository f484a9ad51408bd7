"""What the suite needs of the process it runs in (tests/conftest.py sees to it)."""

import signal


def test_ctrl_c_raises_keyboard_interrupt_as_a_terminal_gives_it():
    """A suite started as a background job of a shell without job control inherits SIGINT ignored; the tests of
    dira3d's Ctrl-C handling (which leaves an ignored signal ignored on purpose) then see no signal at all."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
