"""The OpenAI-compatible HTTP server (`codellama-rt serve`): FastAPI over one AsyncEngine.

Modules: app (routes, auth, errors), protocol (request fields and OpenAI's error shape), streams
(submitting, merging and SSE framing), completions, chat, infill (llama.cpp's /infill), logprobs,
metrics (Prometheus text). Needs the `serve` extra (fastapi, uvicorn, prometheus_client).
"""
