"""Progress bars: live in a terminal, at most every 30 s in a log file (a SLURM .out, `> train.log`)."""

import io

from ldm_users import progress as P


def test_a_log_file_gets_a_slow_bar_and_a_terminal_the_default(monkeypatch):
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    log = Stream(False)
    monkeypatch.setattr(P.sys, "stderr", log)
    assert P.bar_options()["mininterval"] >= 30
    bar = P.progress(range(1000), file=log)
    for _ in bar:
        pass
    bar.close()
    assert log.getvalue().count("\r") <= 3  # the first draw and the final one, not one per update

    monkeypatch.setattr(P.sys, "stderr", Stream(True))
    assert P.bar_options() == {}
