"""Progress bars: live in a terminal, at most every 30 s in a log file (a SLURM .out, `> train.log`)."""

import io
import logging

from ldm_users import progress as P


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_a_log_file_gets_a_slow_bar_and_a_terminal_the_default(monkeypatch):
    log = Stream(False)
    monkeypatch.setattr(P.sys, "stderr", log)
    assert P.bar_options()["mininterval"] >= 30
    bar = P.progress(range(1000), file=log)
    for _ in bar:
        pass
    bar.close()
    assert log.getvalue().count("\r") <= 3  # the first draw and the final one, not one per update

    # The training loop's loss/lr/speed after the bar (every train.log_interval steps) waits for the bar's timed
    # update in a log file, and shows at once in a terminal.
    log = Stream(False)
    monkeypatch.setattr(P.sys, "stderr", log)
    bar = P.progress(range(1000), file=log, desc="ldm")
    for step in bar:
        if step % 10 == 0:
            P.show_postfix(bar, loss=f"{1 / (step + 1):.4f}")
    bar.close()
    assert log.getvalue().count("\r") <= 3 and "loss=" in log.getvalue()

    terminal = Stream(True)
    monkeypatch.setattr(P.sys, "stderr", terminal)
    assert P.bar_options() == {}
    bar = P.progress(range(3), file=terminal, desc="ldm")
    P.show_postfix(bar, loss="0.5000")
    assert "loss=0.5000" in terminal.getvalue()
    bar.close()


def test_in_a_terminal_a_log_line_never_lands_inside_a_bar(monkeypatch):
    terminal = Stream(True)
    monkeypatch.setattr(P.sys, "stderr", terminal)
    root = logging.getLogger()
    console = logging.StreamHandler(terminal)  # as Hydra's console handler, on the terminal the bar draws on
    monkeypatch.setattr(root, "handlers", [console])
    monkeypatch.setattr(root, "level", logging.INFO)
    bar = P.progress(range(3), file=terminal, mininterval=0, desc="steps")
    for step in bar:
        logging.getLogger("ldm_users.test").info("logged at step %d", step)
    bar.close()
    out = terminal.getvalue()
    for step in range(3):
        before = out[:out.index(f"logged at step {step}")]
        assert before.endswith(("\r", "\n")), repr(before[-60:])  # the bar was cleared first, not written over
    # Without the bar-aware handler the line lands right after the bar's text:
    plain = Stream(True)
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(plain)])
    from tqdm.auto import tqdm
    bar = tqdm(range(1), file=plain, mininterval=0, desc="steps")
    for _ in bar:
        logging.getLogger("ldm_users.test").info("logged at step 0")
    assert not plain.getvalue()[:plain.getvalue().index("logged")].endswith(("\r", "\n"))
