"""Prompt sources, triplet shards and the triplet dataset reader/loader."""
