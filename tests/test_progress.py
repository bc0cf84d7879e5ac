"""shards.progress.Progress: what a log file and a resumed run see."""
import io

from shards.progress import Progress


def test_a_log_file_gets_the_last_line_once():
    out = io.StringIO()
    bar = Progress(3, "train", unit="step", stream=out, log_every=0)
    for _ in range(3):
        bar.update(1, extra="loss 1.0")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "3/3 step" in lines[-1]  # before: the 3/3 line twice


def test_a_log_file_gets_a_last_line_that_was_not_drawn():
    out = io.StringIO()
    bar = Progress(3, "train", unit="step", stream=out, log_every=3600)
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "2/3 step" in lines[0]


def test_a_resumed_run_counts_its_earlier_steps_but_not_in_the_rate():
    out = io.StringIO()
    bar = Progress(60, "train", unit="step", stream=out, log_every=3600, initial=50)
    assert "50/60 step" in bar.line() and " 83.3% " in bar.line()
    bar.start -= 10.0  # ten seconds for the ten steps of this process
    for _ in range(10):
        bar.update(1)
    line = bar.line()
    assert "100.0% 60/60 step" in line and "| 1 step/s" in line, line  # not 6 step/s: 50 came from the checkpoint
