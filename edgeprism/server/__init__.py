"""OpenAI-compatible local HTTP server (`edgeprism serve`); needs `pip install 'edgeprism[server]'`.

    from edgeprism.server import BackgroundServer
    with BackgroundServer(engine, port=8000) as server:   # or serve(engine) in the foreground
        ...  # point any OpenAI client at f"{server.url}/v1"
"""

from edgeprism.server.app import DEFAULT_MODEL_ID, create_app, default_model_id
from edgeprism.server.run import BackgroundServer, serve

__all__ = ["DEFAULT_MODEL_ID", "BackgroundServer", "create_app", "default_model_id", "serve"]
