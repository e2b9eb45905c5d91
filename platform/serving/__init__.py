"""Serving: the OpenAI-compatible Ray Serve endpoint for a job's model.

    serving = start_serving(cfg)                 # follows serve.model_alias
    start_serving(cfg, version=3)                # or a registry version
    start_serving(cfg, checkpoint="/path")       # or a local folder (version/HF export/training checkpoint)
    print(serving.base_url)                      # http://127.0.0.1:8000/v1 for any OpenAI client

Modules: app (Serve deployment + routes), openai_schema (request/response
bodies), chat (the ChatML template), engine (batched decoding), text
(detokenising and stop sequences), loader (versions and the alias watcher),
auth (API keys), origin (what web pages may do: Host, Origin/CORS, JSON only),
errors (OpenAI-style errors), streaming (SSE), launch.
Importing this package does not import Ray or torch.
"""

from __future__ import annotations

from model.lazy_exports import lazy_exports

_EXPORTS = {
    "Serving": "platform.serving.launch",
    "start_serving": "platform.serving.launch",
    "stop_serving": "platform.serving.launch",
    "ModelSource": "platform.serving.loader",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
