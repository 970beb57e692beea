"""The live daemon agrees with the simulator (bench/live_switching.py): llmux's bursty profile at a tenth of
its time through a real `python -m sluice` in front of two vLLM-like stand-ins (sleep level 1 and 2).

Deterministic enough: the profile's two switches are forced by its structure (bursts 0.5 s apart, each
served whole; the simulator gives 2 under every service, switch and arrival perturbation up to 5 ms, 30 ms
and 20 ms), and the shares are dominated by the 4.2 s of switching, which the stand-ins time themselves;
live runs land 1-2 % off the prediction, also with both cores busy, against a 10 % tolerance. ~8 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import live_switching as live_switching  # noqa: E402


def test_live_switch_count_and_serving_share_match_the_simulator(tmp_path):
    s = live_switching.setup("bursty", 0.1)
    sim = live_switching.simulate(s)
    assert sim["switches"] == 2
    got = live_switching.live(s, tmp_path)
    assert got["failed"] == 0
    assert got["violations"] == []            # never two models awake, never a request to a sleeping one
    for metric, predicted, measured, diff, ok in live_switching.compare(sim, got, 0.10):
        assert ok, f"{metric}: live {measured:.3f} vs sim {predicted:.3f} ({diff:+.1%})"
