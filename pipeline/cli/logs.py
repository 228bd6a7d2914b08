"""Logging for the entry points: the library only creates loggers, the command configures them."""

from __future__ import annotations

import logging

# Kept at WARNING even with -v: httpx logs every Prefect API call, and the AWS clients log request
# signing (access key ids included) at DEBUG.
QUIET_LOGGERS = ("httpx", "botocore", "aiobotocore", "s3fs", "urllib3")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
