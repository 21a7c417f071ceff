"""Thin command-line entry points over the library (``instaflow-generate``, ``instaflow-interpolate``)."""
