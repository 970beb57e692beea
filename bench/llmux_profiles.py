"""llmux's workload profiles as traces for bench/trace_sim.py: (arrival s, model, priority) tuples.

Re-expressed from doublewordai/llmux tests/policy_sim.rs (its 12 simulated profiles, run at switch costs
2, 5, 10 and 20 s, 0.5 s per job served one at a time, max_wait 15 s) and reports/switching-efficiency.md
(Report 4: the five profiles it ran on an L40, the same generators at the same sizes, against gpt-oss-20b
at sleep level 1 and gemma-12b at level 2). Every job is priority 2: llmux has no priorities.
"""

from __future__ import annotations

SWITCH_COSTS = (2.0, 5.0, 10.0, 20.0)
SERVICE_S = 0.5
MAX_WAIT_S = 15.0
PRIO = 2


def single_model(n=40):
    return [(i * 0.1, "A", PRIO) for i in range(n)]


def balanced(pairs=20):
    """A, B, A, B... one every 0.1 s: serial alternating traffic, never two waiting for the same model."""
    return [x for i in range(pairs) for x in (((2 * i) * 0.1, "A", PRIO), ((2 * i + 1) * 0.1, "B", PRIO))]


def bursty(size=10, bursts=4):
    return [(b * 5.0 + i * 0.01, "AB"[b % 2], PRIO) for b in range(bursts) for i in range(size)]


def dominant(total=50, share=0.8):
    """`share` of the jobs for A, the rest for B spread evenly through them, one every 50 ms."""
    b_total = int(total * (1.0 - share))           # llmux truncates the float the same way (50 -> 9 B jobs)
    out, bc = [], 0
    for i in range(total):
        bt = int((i + 1) / total * b_total)
        if bc < bt and bc < b_total:
            out.append((i * 0.05, "B", PRIO))
            bc += 1
        else:
            out.append((i * 0.05, "A", PRIO))
    return out


def interleave(per_model=30):
    """Concurrent clients of both models: A and B 1 ms apart, every 10 ms."""
    return [x for i in range(per_model) for x in ((i * 0.01, "A", PRIO), (i * 0.01 + 0.001, "B", PRIO))]


def surge(base_rate=2, size=20):
    """A steady stream of A at `base_rate`/s for 10 s; a burst of `size` B jobs lands at 5 s."""
    return ([(i / base_rate, "A", PRIO) for i in range(base_rate * 10)]
            + [(5.0 + i * 0.01, "B", PRIO) for i in range(size)])


def three_model(per_model=10):
    return [((r * 3 + mi) * 3.0 + i * 0.1, m, PRIO) for r in range(2) for mi, m in enumerate("ABC")
            for i in range(per_model)]


def random_mixed(n, seed):
    """llmux's LCG (Knuth's MMIX constants, 64-bit wrap), so the trace is theirs job for job."""
    mask = (1 << 64) - 1
    state, t, out = seed, 0.0, []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) & mask
        t += ((state >> 40) % 200) / 1000.0
        out.append((t, "A" if (state >> 33) % 2 == 0 else "B", PRIO))
    return out


# (name, trace) in the order policy_sim.rs prints them
SIM_PROFILES = [
    ("single_model", single_model(40)),
    ("balanced", balanced(20)),
    ("bursty", bursty(10, 4)),
    ("dominant", dominant(50, 0.8)),
    ("interleave", interleave(30)),
    ("surge", surge(2, 20)),
    ("three_model", three_model(10)),
    ("random_50", random_mixed(50, 42)),
    ("random_100", random_mixed(100, 123)),
    ("random_200", random_mixed(200, 456)),
    ("dominant_95", dominant(80, 0.95)),
    ("heavy_burst", bursty(50, 6)),
]

# Report 4's real-GPU runs: the first five generators at these sizes (40, 40, 40, 50 and 60 jobs), on an L40
# where a switch to gpt-oss-20b (A, level 1) took 3.6 s and one to gemma-12b (B, level 2) 38.5 s (Report 1).
GPU_PROFILES = [(name, trace) for name, trace in SIM_PROFILES
                if name in ("single_model", "balanced", "bursty", "dominant", "interleave")]
L40_COSTS = {("A", "B"): 38.5, ("B", "A"): 3.6, "default": 38.5}
L40_MIN_ACTIVE_S = 5.0       # Report 4's min_active_secs
