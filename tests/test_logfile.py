"""The recorder's log handlers: one write per batch, size-based rotation without asking the file system."""

from __future__ import annotations

import io
import logging
import threading

from sluice import logfile


class CountingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


def logger_with(handler: logging.Handler, name: str) -> logging.Logger:
    lg = logging.getLogger(name)
    lg.handlers[:] = [handler]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    return lg


def test_records_are_written_at_once_outside_a_batch_and_together_at_its_end():
    out = CountingStream()
    lg = logger_with(logfile.BatchHandler(out), "test.logfile.batch")
    lg.info("alone")
    assert out.getvalue() == "alone\n" and out.writes == 1
    with logfile.batch():
        for i in range(5):
            lg.info("req=%d", i)
        assert out.getvalue() == "alone\n"             # nothing yet: the batch is still open
    assert out.getvalue().splitlines() == ["alone"] + [f"req={i}" for i in range(5)]
    assert out.writes == 2                              # the five lines went out in one write


def test_a_batch_on_one_thread_does_not_hold_back_another_threads_records():
    out = CountingStream()
    lg = logger_with(logfile.BatchHandler(out), "test.logfile.threads")
    with logfile.batch():
        lg.info("batched")
        t = threading.Thread(target=lambda: lg.info("other thread"))
        t.start()
        t.join(5)
        # the other thread's record flushes the shared buffer, the batched line with it: order kept
        assert out.getvalue() == "batched\nother thread\n"
    assert out.getvalue() == "batched\nother thread\n"


def test_rotating_file_rolls_over_by_size_and_keeps_that_many_backups(tmp_path):
    path = tmp_path / "x.log"
    h = logfile.file_handler(path, max_bytes=100, backups=2)
    lg = logger_with(h, "test.logfile.rotate")
    for i in range(40):
        lg.info("line %02d %s", i, "x" * 20)          # 29 bytes a line: three lines per file
    h.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["x.log", "x.log.1", "x.log.2"]
    newest = path.read_text().splitlines()
    assert newest[-1].startswith("line 39") and all(len(p.read_bytes()) <= 100 for p in tmp_path.iterdir())
    kept = [ln for name in ("x.log.2", "x.log.1", "x.log") for ln in (tmp_path / name).read_text().splitlines()]
    assert [int(ln.split()[1]) for ln in kept] == list(range(40 - len(kept), 40))   # in order, none lost between


def test_rotating_file_appends_to_an_existing_file_counting_its_size(tmp_path):
    path = tmp_path / "y.log"
    path.write_text("z" * 90 + "\n")
    h = logfile.file_handler(path, max_bytes=100, backups=1)
    logger_with(h, "test.logfile.append").info("0123456789")
    h.close()
    assert (tmp_path / "y.log.1").read_text() == "z" * 90 + "\n" and path.read_text() == "0123456789\n"


def test_a_record_shared_by_two_handlers_is_formatted_once():
    class Counted:
        calls = 0

        def __str__(self):
            Counted.calls += 1
            return "payload"

    fmt = logfile.OnceFormatter("%(levelname)s %(message)s")
    a, b = logfile.BatchHandler(io.StringIO()), logfile.BatchHandler(io.StringIO())
    a.setFormatter(fmt)
    b.setFormatter(fmt)
    lg = logger_with(a, "test.logfile.once")
    lg.addHandler(b)
    lg.info("%s", Counted())
    lg.info("%s", Counted())
    assert a.sink.getvalue() == b.sink.getvalue() == "INFO payload\nINFO payload\n"
    assert Counted.calls == 2                   # once per record, not once per handler
