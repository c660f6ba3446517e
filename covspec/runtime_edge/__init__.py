"""Edge runtime: the target VLM server (``covspec edge serve``).

Import ``EdgeServer`` / ``ServerConfig`` from here; torch loads only when a server starts.
"""

from covspec.runtime_edge.config import ConfigError, ServerConfig

__all__ = ["ConfigError", "EdgeServer", "EdgeProcess", "ServerConfig", "TargetModel"]


def __getattr__(name: str):
    if name == "EdgeServer":
        from covspec.runtime_edge.server import EdgeServer
        return EdgeServer
    if name == "EdgeProcess":
        from covspec.runtime_edge.process import EdgeProcess
        return EdgeProcess
    if name == "TargetModel":
        from covspec.runtime_edge.target import TargetModel
        return TargetModel
    raise AttributeError(name)
