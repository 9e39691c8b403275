"""Rendering: text, CSV/JSON files, plots, the HTML report and progress bars. Nothing here computes a number."""
