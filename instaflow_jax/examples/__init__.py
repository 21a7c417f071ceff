"""Worked examples: the small-scale reproduction of InstaFlow on procedural data (``toy``)."""
