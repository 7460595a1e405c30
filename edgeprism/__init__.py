"""edgeprism: run Mixture-of-Experts language models on GPUs too small to hold them."""

from edgeprism import errors
from edgeprism.api import DEFAULT_MODEL, Engine, generate, load, stream
from edgeprism.cache.keys import SubExpertKey

__all__ = ["DEFAULT_MODEL", "Engine", "SubExpertKey", "errors", "generate", "load", "stream"]
__version__ = "0.1.0"
