"""Ollama's native API: /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version, /api/embed (an ingress adapter over the one job path, jobs.py). Under construction this round."""

from __future__ import annotations

from sluice.jobs import JobPath
from sluice.server import Route


class OllamaApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        return []
