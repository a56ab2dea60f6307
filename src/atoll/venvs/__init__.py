"""Isolated, uv-built, cached environments for actors, and extension folders."""

from ._build import BuiltEnv, Progress, build, find_uv
from ._env import Env, default_cache_dir
from ._extension import Extension, read_extension

__all__ = [
    "BuiltEnv",
    "Env",
    "Extension",
    "Progress",
    "build",
    "default_cache_dir",
    "find_uv",
    "read_extension",
]
