"""The daemon: logging set-up and `serve` (start the App, act on signals, stop it gracefully). `sluice serve`
(cli.py) and `sluice demo` (demo.py) both run it.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from pathlib import Path

from sluice import __version__, logfile
from sluice.config import ConfigError, Settings, load


def setup_logging(log_dir: Path, verbose: bool = False) -> None:
    # The daemon's formats use neither the caller's file and line nor thread or process names; not
    # computing them saves a stack walk per record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logfile.OnceFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    err = logfile.BatchHandler(sys.stderr)
    err.setFormatter(fmt)
    root.addHandler(err)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logfile.file_handler(log_dir / "sluice.log", 10 << 20, 3)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError as e:
        logging.getLogger("sluice").warning("cannot write logs to %s (%s); logging to stderr only", log_dir, e)


def serve(args, settings: Settings | None = None, ready: threading.Event | None = None) -> int:
    from sluice.app import App
    settings = settings or load(getattr(args, "config", None))
    setup_logging(settings.log_dir, getattr(args, "verbose", False))
    try:
        app = App(settings)
    except OSError as e:
        print(f"sluice: cannot listen on {settings.host}:{settings.port}: {e.strerror}; "
              "is another sluice running? (SLUICE_PORT picks another port)", file=sys.stderr)
        return 1
    wake = threading.Event()
    pending: list[int] = []

    def on_signal(signum, frame):  # only records the signal; the main thread acts on it
        pending.append(signum)
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    app.start()
    # Everything built so far lives as long as the daemon: move it out of the collector's sight, so a
    # full collection (a pause every request in flight pays) walks only what requests create.
    gc.freeze()
    print(f"sluice {__version__} listening on {app.url}", file=sys.stderr, flush=True)
    if ready is not None:
        ready.set()
    log = logging.getLogger("sluice")
    while True:
        # A timeout, not a bare wait: the kernel may deliver a signal to another thread, and Python runs
        # the handler only when the main thread next executes, so the main thread must wake up now and then.
        if not wake.wait(0.5):
            continue
        wake.clear()
        signums = []
        while pending:                      # pop one by one: a signal may land while we read
            signums.append(pending.pop(0))
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            break
        try:
            app.reload(load(getattr(args, "config", None)))
        except ConfigError as e:
            log.error("reload rejected, keeping the running configuration: %s", e)
    log.info("stopping: queued requests get 503, in-flight ones have up to %.0fs", settings.shutdown_timeout_s)
    app.stop()
    return 0
