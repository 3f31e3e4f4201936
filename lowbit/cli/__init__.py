"""The `lowbit` command: a thin layer over the library.

One module per subcommand (formats, quantize, eval, compare, memory, report), each with a
`register(sub)` that adds its parser and returns {command: handler}; `common` holds what they share
(argument checks, the text and its calibration windows). A subcommand never imports another one,
nor this package's __init__; main.py builds the parser from them.
"""
from .main import main

__all__ = ["main"]
