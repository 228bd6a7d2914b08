"""Dated URIs for scheduled runs: ``s3://bucket/out/{date}`` becomes ``s3://bucket/out/2026-11-21``.

A nightly deployment names its output once; each run fills in the date it was scheduled for, so it lands
in its own prefix, and a re-run of that date finds its committed shards and resumes instead of duplicating.
"""

from __future__ import annotations

import re
from datetime import date, datetime

from pipeline.config import JobConfig, load_config
from pipeline.errors import ConfigError

DATE_FORMAT = "%Y-%m-%d"
_FIELD = re.compile(r"\{date(?::([^{}]*))?\}")


def render_uri(template: str | None, when: date | datetime) -> str | None:
    """Replace ``{date}`` (YYYY-MM-DD) or ``{date:<strftime format>}`` (e.g. ``{date:%Y/%m/%d}``)."""
    if template is None:
        return None
    return _FIELD.sub(lambda m: when.strftime(m.group(1) or DATE_FORMAT), template)


def parse_run_date(value: str) -> date:
    """A ``run_date`` parameter: YYYY-MM-DD; ConfigError says what was expected."""
    try:
        return datetime.strptime(value, DATE_FORMAT).date()
    except ValueError:
        raise ConfigError(f"run_date must be YYYY-MM-DD, got {value!r}") from None


def render_uris(cfg: JobConfig, when: date | datetime) -> JobConfig:
    """``cfg`` with ``{date}`` filled in its input, labels and output URIs."""
    fields = ("input_uri", "labels_uri", "output_uri")
    return cfg.model_copy(update={f: render_uri(getattr(cfg, f), when) for f in fields})


def job_config(config_path: str | None, overrides: dict, when: date | datetime) -> JobConfig:
    """The JobConfig of the run for ``when``: the YAML at ``config_path``, the overrides, then ``{date}``
    filled in. The flow and ``segpipe run`` both build it here, so both check the same config."""
    return render_uris(load_config(config_path, **overrides), when)
