"""Evaluation like the paper: FID (Inception-v3 pool features) and CLIP score on MS COCO captions.

Generation, Inception and CLIP features run on device, data-parallel over every device; features
are written in shards so an interrupted evaluation resumes where it stopped (docs/evaluation.md).
"""
