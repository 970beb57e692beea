"""Anthropic Messages: POST /v1/messages, /v1/messages/count_tokens (an ingress adapter over the one job path, jobs.py). Under construction this round."""

from __future__ import annotations

from sluice.jobs import JobPath
from sluice.server import Route


class AnthropicApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        return []
