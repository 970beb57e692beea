"""The OpenAPI 3.0 description of every route in the route table (a test keeps the two in step)."""

from __future__ import annotations

from sluice import __version__

_PRIORITY = {"type": "integer", "minimum": 0, "maximum": 4, "description": "0 = most urgent (P_CRITICAL) .. 4 = P_BG"}
_MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"type": "string"}, "content": {"oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "description": "text, image_url, ..."}, "text": {"type": "string"},
            "image_url": {"type": "object", "properties": {"url": {"type": "string"}}}}}}]}}}}

SCHEMAS = {
    "NativeError": {"type": "object", "required": ["status", "error"],
                    "properties": {"status": {"type": "string"}, "error": {"type": "string"}}},
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}},
    "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
        "type": {"type": "string", "enum": ["error"]}, "error": {
            "type": "object", "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}},
    "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "QueryRequest": {"type": "object", "required": ["prompt"], "properties": {
        "model": {"type": "string", "description": "model name or alias; `cloud` for Anthropic"},
        "prompt": {"type": "string", "minLength": 1}, "system": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "priority": _PRIORITY, "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}},
    "QueryResponse": {"type": "object", "required": ["status", "result"], "properties": {
        "status": {"type": "string", "enum": ["ok"]}, "source": {"type": "string", "enum": ["local", "cloud"]},
        "result": {"type": "string"}, "id": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status"], "properties": {
        "status": {"type": "string", "enum": ["ok", "warming", "degraded", "draining"]},
        "models_ready": {"type": "integer"}, "models_total": {"type": "integer"},
        "backends": {"type": "object"}, "model_status": {"type": "object"}, "queue": {"type": "object"}}},
    "QueueStatus": {"type": "object", "properties": {k: {"type": "number"} for k in (
        "pending", "active_elapsed_s", "total_served", "total_rejected", "total_timeouts", "total_cancelled",
        "total_errors", "avg_latency_ms", "uptime_s")}},
    "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"}, "messages": _MESSAGES, "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "priority": _PRIORITY, "stream_options": {"type": "object"}}},
    "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": {"type": "string"}, "prompt": {"type": "string"}, "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1}, "priority": _PRIORITY}},
    "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"}, "input": {"type": "string"}, "priority": _PRIORITY}},
    "Models": {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array"}}},
    "AdminStatus": {"type": "object", "properties": {k: {"type": "object"} for k in ("queue", "cloud", "totals")}},
}

# path -> (summary, request schema or None, 200 response schema/content type, error schema)
_DOCS = {
    ("POST", "/v1/query"): ("Queue a prompt (sluice-native)", "QueryRequest", "QueryResponse", "NativeError"),
    ("GET", "/v1/health"): ("Health from live backend probes", None, "Health", "NativeError"),
    ("GET", "/v1/ready"): ("Readiness for a load balancer: 200 when this instance takes new work, else 503",
                           None, None, "NativeError"),
    ("GET", "/v1/queue/status"): ("Queue counters", None, "QueueStatus", "NativeError"),
    ("POST", "/v1/chat/completions"): ("OpenAI chat completions (SSE when stream=true)", "ChatCompletionRequest",
                                       None, "OpenAIError"),
    ("POST", "/v1/completions"): ("OpenAI completions", "CompletionRequest", None, "OpenAIError"),
    ("POST", "/v1/embeddings"): ("OpenAI embeddings", "EmbeddingRequest", None, "OpenAIError"),
    ("POST", "/v1/responses"): ("OpenAI Responses (SSE when stream=true)", None, None, "OpenAIError"),
    ("POST", "/v1/messages"): ("Anthropic Messages (SSE when stream=true)", None, None, "AnthropicError"),
    ("POST", "/v1/messages/count_tokens"): ("Anthropic token count (an estimate; never queued)", None, None,
                                            "AnthropicError"),
    ("POST", "/api/chat"): ("Ollama chat (NDJSON stream unless stream=false)", None, None, "OllamaError"),
    ("POST", "/api/generate"): ("Ollama generate (NDJSON stream unless stream=false)", None, None, "OllamaError"),
    ("POST", "/api/embed"): ("Ollama embeddings", None, None, "OllamaError"),
    ("POST", "/api/embeddings"): ("Ollama embeddings (the older form)", None, None, "OllamaError"),
    ("GET", "/api/tags"): ("Ollama: the configured models", None, None, "OllamaError"),
    ("GET", "/api/ps"): ("Ollama: what each gate has loaded", None, None, "OllamaError"),
    ("POST", "/api/show"): ("Ollama: one model's details", None, None, "OllamaError"),
    ("POST", "/api/pull"): ("Ollama pull: success for a configured model (nothing is downloaded)", None, None,
                            "OllamaError"),
    ("GET", "/api/version"): ("The Ollama API level sluice implements", None, None, "OllamaError"),
    ("GET", "/v1/models"): ("Configured models and aliases", None, "Models", "OpenAIError"),
    ("GET", "/v1/models/"): ("One model (the SDKs' models.retrieve)", None, None, "OpenAIError"),
    ("GET", "/admin/status"): ("Everything the dashboard shows", None, "AdminStatus", "OpenAIError"),
    ("POST", "/admin/drain"): ("Stop admitting new requests", None, None, "OpenAIError"),
    ("POST", "/admin/resume"): ("Admit new requests again after a drain", None, None, "OpenAIError"),
    ("GET", "/admin/log"): ("The last n request-log entries (?n=1..200, default 100)", None, None, "OpenAIError"),
    ("GET", "/metrics"): ("Prometheus text format 0.0.4", None, "text/plain", "OpenAIError"),
    ("GET", "/"): ("Live dashboard", None, "text/html", "OpenAIError"),
    ("GET", "/ui"): ("Live dashboard", None, "text/html", "OpenAIError"),
    ("GET", "/openapi.json"): ("This document", None, None, "OpenAIError"),
}


# Routes that may answer with a stream, and its content type.
_STREAMS = {"/v1/chat/completions": "text/event-stream", "/v1/completions": "text/event-stream",
            "/v1/responses": "text/event-stream", "/v1/messages": "text/event-stream",
            "/api/chat": "application/x-ndjson", "/api/generate": "application/x-ndjson"}

# A prefix route's path parameters, by prefix.
_PREFIX_PARAMS = {"/admin/models/": ("name", "action"), "/v1/models/": ("model",)}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def spec(routes) -> dict:
    paths: dict = {}
    for r in routes:
        params = _PREFIX_PARAMS.get(r.path, ("name", "action")) if r.prefix else ()
        path = r.path + "/".join("{%s}" % n for n in params) if r.prefix else r.path
        summary, req, ok, err = _DOCS.get((r.method, r.path), (r.path, None, None, "OpenAIError"))
        if ok in ("text/plain", "text/html"):
            ok_content = {ok: {"schema": {"type": "string"}}}
        else:
            ok_content = {"application/json": {"schema": _ref(ok) if ok else {"type": "object"}}}
            if r.path in _STREAMS:
                ok_content[_STREAMS[r.path]] = {"schema": {"type": "string"}}
        op = {"summary": summary, "responses": {"200": {"description": "ok", "content": ok_content}}}
        for code in ("400", "401", "404", "405", "413", "502", "503", "504"):
            op["responses"][code] = {"description": "error", "content": {"application/json": {"schema": _ref(err)}}}
        if req:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(req)}}}
        if r.prefix:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                for n in params]
        paths.setdefault(path, {})[r.method.lower()] = op
    return {"openapi": "3.0.3", "info": {"title": "sluice", "version": __version__},
            "paths": paths, "components": {"schemas": SCHEMAS}}
