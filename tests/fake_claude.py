#!/usr/bin/env python3
"""Stands in for the `claude` CLI: records its argv (FAKE_CLAUDE_ARGV_FILE) and prints a reply;
FAKE_CLAUDE_EXIT makes it fail with that code."""
import json
import os
import sys

with open(os.environ["FAKE_CLAUDE_ARGV_FILE"], "w") as f:
    json.dump(sys.argv[1:], f)
if os.environ.get("FAKE_CLAUDE_EXIT"):
    print("claude: something went wrong", file=sys.stderr)
    sys.exit(int(os.environ["FAKE_CLAUDE_EXIT"]))
print("cli answer")
