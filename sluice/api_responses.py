"""OpenAI Responses: POST /v1/responses (an ingress adapter over the one job path, jobs.py). Under construction this round."""

from __future__ import annotations

from sluice.jobs import JobPath
from sluice.server import Route


class ResponsesApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        return []
