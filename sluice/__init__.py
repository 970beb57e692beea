"""sluice: a priority-queue LLM request router for local GPUs.

    from sluice import sluice, P_CRITICAL
    text = sluice.query("fast", "What is 2+2?", priority=P_CRITICAL)
"""

__version__ = "0.1.0"

P_CRITICAL, P_HIGH, P_NORMAL, P_LOW, P_BG = range(5)

__all__ = ["sluice", "SluiceClient", "AsyncSluiceClient", "P_CRITICAL", "P_HIGH", "P_NORMAL", "P_LOW", "P_BG",
           "__version__"]


def __getattr__(name: str):
    # The client is imported on first use, so `python -m sluice` (the daemon) never loads it.
    if name in ("sluice", "SluiceClient"):
        from sluice import client
        return getattr(client, name)
    if name == "AsyncSluiceClient":
        from sluice.aclient import AsyncSluiceClient
        return AsyncSluiceClient
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
