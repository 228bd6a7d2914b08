"""The ``segpipe`` command: an entry point over the core, which never imports it.

- ``main``: the parser and the dispatch; ``commands``: what each subcommand does;
- ``job_flags``: the ``run`` flags, derived from JobConfig; ``logs``: logging for entry points.
"""

from pipeline.cli.main import main

__all__ = ["main"]
