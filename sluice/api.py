"""The client-facing APIs, wired over the one job path (jobs.py): sluice-native (api_native.py),
OpenAI-compatible (api_openai.py), and the ingress adapters beside them: Anthropic Messages
(api_anthropic.py), OpenAI Responses (api_responses.py), Ollama (api_ollama.py). Each route validates its
input completely before anything reaches the scheduler (invariant 7), then runs the same life of a job:
submit -> wait for a grant (watching the client) -> forward -> finish once.
"""

from __future__ import annotations

from sluice.api_anthropic import AnthropicApi
from sluice.api_native import NativeApi
from sluice.api_ollama import OllamaApi
from sluice.api_openai import OpenAIApi
from sluice.api_responses import ResponsesApi
from sluice.config import Settings
from sluice.jobs import JobPath
from sluice.server import Route


class Api:
    def __init__(self, settings: Settings, scheduler, upstreams, cloud, **kw):
        self.jobs = JobPath(settings, scheduler, upstreams, cloud, **kw)
        self.native = NativeApi(self.jobs)
        self.surfaces = [self.native, OpenAIApi(self.jobs), AnthropicApi(self.jobs), ResponsesApi(self.jobs),
                         OllamaApi(self.jobs)]

    @property
    def settings(self) -> Settings:
        return self.jobs.settings

    @property
    def models(self) -> dict:
        return self.jobs.models

    def reconfigure(self, settings: Settings) -> None:
        self.jobs.reconfigure(settings)

    def health_doc(self, snap: dict) -> dict:
        return self.native.health_doc(snap)

    def routes(self) -> list[Route]:
        return [r for s in self.surfaces for r in s.routes()]
