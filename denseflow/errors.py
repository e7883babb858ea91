"""The one base class of the errors denseflow reports to its users.

A :class:`DenseFlowError` says that an input cannot work — a configuration value, a file, a
folder, a checkpoint, a dataset — or that a run cannot go on, in one line that names what and
where. The command line prints it as ``denseflow <command>: error: <message>`` with exit code 2.
Any other exception raised inside denseflow is a bug of denseflow, not of its input: the command
line shows its traceback and asks for a report. It subclasses :class:`ValueError`, which code
written against denseflow 0.1 caught.
"""

from __future__ import annotations


class DenseFlowError(ValueError):
    """Bad input or a run that cannot continue; the one-line message names what and where."""
