"""Which errors are the user's to fix, said in one line.

A :class:`UserError` is bad input or a refusal whose message is the whole story: a shard, weights or a
tokenizer that do not fit, a refused config or resume, a table that cannot be converted, a failed write.
The message names the file, the sample or the setting; the command line (``aol ...`` and
``python -m aol_dist.train``) prints it in one line, without a traceback. Every other exception keeps its
traceback: it is a bug, and the traceback says where. Each such error class derives from this one and from
the built-in it always was (``ValueError``, ``OSError``, ``RuntimeError``), so code that caught it by that
name still does.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user fixes from its one-line message (see the module docstring)."""
