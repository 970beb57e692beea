"""The live model table: which models clients may ask for, and which backends serve each.

The configured `[[models]]`, widened by what backends list (their manifests: a `models` list in the file, or
what GET /v1/models said) and by models a reload removed that still have queued work ("retiring"). Its
writers (the health thread with a new manifest, a reload, the retiring sweep) take `_lock` in turn; each
change goes to the scheduler first, then to the request path, so a model is queueable before a request can
name it, and a request that named a model just dropped meets the scheduler's clear 503.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, Iterable, Mapping

from sluice.config import CLOUD, ModelConfig, Settings

log = logging.getLogger("sluice.models")


def model_table(settings: Settings, manifests: Mapping[str, Iterable[str]],
                retiring: Iterable[ModelConfig] = ()) -> tuple[tuple[ModelConfig, ...], dict[str, str]]:
    """The models clients may ask for now, each with the backends that serve it, given backend manifests.

    `manifests`: backend name -> the upstream model ids it serves (a `models` list from the file, or what
    its GET /v1/models said last; a backend not in it has told nothing yet). Returns the models (each
    ModelConfig's `backends` filled in) and where each came from: "config", "discovered" or "retiring".

    1. A `[[models]]` entry is served by the backends it names, whatever their manifests say (the operator
       said so), and also by every backend whose manifest lists its `upstream_model`.
    2. A manifest id that no `[[models]]` entry has as its upstream_model becomes a model of that name,
       served by every backend listing it; unless the id is already a configured name or alias, or `cloud`
       (the configured name wins).
    3. `retiring` models (removed by a reload while jobs were queued) keep the backends they had, unless
       the new configuration uses their name.
    """
    listing: dict[str, list[str]] = {}
    for b in settings.backends:
        for mid in manifests.get(b.name, ()):
            listing.setdefault(mid, []).append(b.name)
    out: list[ModelConfig] = []
    source: dict[str, str] = {}
    for m in settings.models:
        extra = [b for b in listing.get(m.upstream_model, ()) if b not in m.backends]
        out.append(dataclasses.replace(m, backends=m.backends + tuple(extra)) if extra else m)
        source[m.name] = "config"
    taken = {n for m in settings.models for n in (m.name, *m.aliases)} | {CLOUD}
    claimed = {m.upstream_model for m in settings.models}
    for mid in sorted(listing):
        if mid not in claimed and mid not in taken:
            out.append(ModelConfig(name=mid, upstream_model=mid, backends=tuple(listing[mid])))
            source[mid] = "discovered"
            taken.add(mid)
    for m in retiring:
        if m.name not in taken:
            out.append(m)
            source[m.name] = "retiring"
            taken.add(m.name)
    return tuple(out), source


def _limits(models: Iterable[ModelConfig]) -> dict[str, int]:
    """Each model's max_concurrency, for the scheduler (a model without one is not named)."""
    return {m.name: m.max_concurrency for m in models if m.max_concurrency is not None}


class ModelTable:
    """The table and its writers; `models` and `sources` are replaced whole, so readers need no lock."""

    def __init__(self, settings: Settings):
        self._lock = threading.Lock()
        self._settings = settings
        self._manifests: dict[str, frozenset[str]] = {b.name: frozenset(b.models) for b in settings.backends
                                                      if not b.discover}
        self._retiring: dict[str, ModelConfig] = {}
        self._failing: set[str] = set()
        self.models, self.sources = model_table(settings, self._manifests)
        self._scheduler = None
        self._publish: Callable[[Settings], None] = lambda settings: None

    def serving(self, backend: str) -> frozenset[str]:
        """The models `backend` serves now."""
        return frozenset(m.name for m in self.models if backend in m.backends)

    def effective(self) -> Settings:
        """The settings the request path sees: the configured ones with the live models."""
        s, models = self._settings, self.models
        return s if models == s.models else dataclasses.replace(s, models=tuple(models))

    def bind(self, scheduler, publish: Callable[[Settings], None]) -> None:
        """Where changes go: the scheduler (`set_models`), then `publish(effective settings)`."""
        self._scheduler, self._publish = scheduler, publish
        scheduler.set_models({}, known=[m.name for m in self.models],   # a queue even before a backend has it
                             limits=_limits(self.models))

    def manifest(self, backend: str) -> list[str] | None:
        """What a backend serves as sluice knows it (None: a discovering backend that has not told yet)."""
        ids = self._manifests.get(backend)
        return sorted(ids) if ids is not None else None

    def report(self, backend: str, ids: list[str] | None) -> None:
        """A discovering backend's GET /v1/models, read by the health thread (None: that read failed)."""
        if ids is None:
            # Keep the last list: a backend that is really gone fails its probe and health takes it out.
            if backend not in self._failing:
                self._failing.add(backend)
                log.warning("backend %s: cannot read its model list (GET /v1/models); keeping the last one",
                            backend)
            return
        self._failing.discard(backend)
        new = frozenset(ids)
        with self._lock:
            if self._manifests.get(backend) == new:
                return
            self._manifests[backend] = new
            log.info("backend %s lists %d model(s): %s", backend, len(new), ", ".join(sorted(new)) or "none")
            self._apply_locked(f"is no longer served by any backend ({backend!r} stopped listing it at "
                               "GET /v1/models)")

    def reload(self, new: Settings) -> str:
        """Take a re-read configuration's models; returns what changed, for the log. A removed model with
        queued or in-flight jobs retires: it takes no new requests and serves those on the backends it had,
        unless the new configuration uses its name for something else (then they fail at once, 503)."""
        with self._lock:
            before = {m.name: m for m in self.models}
            for b in new.backends:
                if not b.discover:
                    self._manifests[b.name] = frozenset(b.models)
            kept, _ = model_table(new, self._manifests)
            names = {n for m in kept for n in (m.name, *m.aliases)}
            for name, m in before.items():
                if name not in names and self._scheduler.has_jobs(name):
                    self._retiring[name] = m       # as it was served: its backends, its upstream id
            self._settings = new
            self._apply_locked("was removed from the configuration by a reload (or renamed, or no backend "
                               "serves it now)")
            now = {m.name for m in self.models}
            return (f"models added: {', '.join(sorted(now - set(before))) or 'none'}; removed: "
                    f"{', '.join(sorted(set(before) - now)) or 'none'}; retiring until their queued requests "
                    f"are done: {', '.join(self._retiring) or 'none'}")

    def retire_drained(self) -> None:
        """Drop retiring models whose queued and in-flight jobs are all done (on the health thread's tick)."""
        if not self._retiring:
            return
        with self._lock:
            done = [n for n in self._retiring if not self._scheduler.has_jobs(n)]
            if done:
                for n in done:
                    del self._retiring[n]
                log.info("removed model(s) %s: their last queued requests are done", ", ".join(done))
                self._apply_locked("was removed from the configuration")

    def _apply_locked(self, reason: str) -> None:
        models, sources = model_table(self._settings, self._manifests, self._retiring.values())
        self._retiring = {n: m for n, m in self._retiring.items() if sources.get(n) == "retiring"}
        serving = {b.name: frozenset(m.name for m in models if b.name in m.backends)
                   for b in self._settings.backends}
        self._scheduler.set_models(serving, known=[m.name for m in models], retired=self._retiring,
                                   limits=_limits(models), reason=reason)
        self.models, self.sources = models, sources
        self._publish(self.effective())
