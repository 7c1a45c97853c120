"""Reports: figures, a self-contained HTML report and a Markdown summary."""
