#!/usr/bin/env python3
"""Stands in for the `claude` CLI.

Writes its argv (without argv[0]) as a JSON list to the file named by FAKE_CLAUDE_ARGV_FILE (when set), then:
  FAKE_CLAUDE_EXIT=N    prints an error to stderr and exits N
  FAKE_CLAUDE_HANG=1    writes its pid to FAKE_CLAUDE_PID_FILE (when set) and sleeps (until killed)
  otherwise             prints FAKE_CLAUDE_REPLY (default "cli answer")
It reads stdin first, so a run whose stdin is not closed (not /dev/null) would hang instead of answering.
"""
import json
import os
import sys
import time

stdin = sys.stdin.read() if sys.stdin is not None else ""
if os.environ.get("FAKE_CLAUDE_ARGV_FILE"):
    with open(os.environ["FAKE_CLAUDE_ARGV_FILE"], "w") as f:
        json.dump(sys.argv[1:], f)
if os.environ.get("FAKE_CLAUDE_EXIT"):
    print("claude: something went wrong", file=sys.stderr)
    sys.exit(int(os.environ["FAKE_CLAUDE_EXIT"]))
if os.environ.get("FAKE_CLAUDE_HANG"):
    if os.environ.get("FAKE_CLAUDE_PID_FILE"):
        with open(os.environ["FAKE_CLAUDE_PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    time.sleep(60)
print(os.environ.get("FAKE_CLAUDE_REPLY", "cli answer") + (f" (stdin {len(stdin)} bytes)" if stdin else ""))
