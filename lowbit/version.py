"""lowbit's version, in the one place every layer may read it (it imports nothing).

pyproject.toml reads it too ([tool.setuptools.dynamic]); io/streaming.py hashes it into a resume
journal's digest, so a job started by another version starts again instead of mixing two
quantizers' shards.
"""
__version__ = "0.1.0"
