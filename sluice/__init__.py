"""sluice: a priority-queue LLM request router for local GPUs.

    from sluice import sluice, P_CRITICAL
    text = sluice.query("fast", "What is 2+2?", priority=P_CRITICAL)
"""

__version__ = "0.1.0"

P_CRITICAL, P_HIGH, P_NORMAL, P_LOW, P_BG = range(5)

from sluice.client import SluiceClient, sluice  # noqa: E402  (client needs the P_* names above)

__all__ = ["sluice", "SluiceClient", "P_CRITICAL", "P_HIGH", "P_NORMAL", "P_LOW", "P_BG", "__version__"]
