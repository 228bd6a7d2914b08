"""What a finished run reports.

- ``summary.py``: the one-screen summary and the Prefect artifacts' contents;
- ``report.html``: ``run_data.py`` gathers a run's aggregates from its outputs (never all of its data),
  ``charts.py`` draws them, ``gallery.py`` renders the worst images, ``page.py`` writes the page;
- ``overlays.py``: images blended with their masks;
- ``drift.py``: two runs compared, class by class.
"""

from pipeline.report.summary import format_summary, metrics_table, summary_markdown

__all__ = ["format_summary", "metrics_table", "summary_markdown"]
