"""segpipe: batch semantic segmentation of large image datasets.

The core (this package) is plain Python: it imports neither Ray nor Prefect at
module level. ``pipeline.execution`` wraps the shard processor in Ray actors and
``flows/`` wires the steps into Prefect flows.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segpipe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
