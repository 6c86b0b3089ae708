"""`dimoo serve`: an OpenAI-compatible HTTP server with step-level continuous batching (see `scheduler`, `app`).

FastAPI and uvicorn are imported only here (the ``serve`` extra), never by ``dimoo --help`` or the other commands.
"""
