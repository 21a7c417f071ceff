"""Prompt tokenisation with the pipeline's ``CLIPTokenizer`` (padded to ``max_length`` = 77)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def load_tokenizer(folder: str) -> Any:
    """``transformers.CLIPTokenizer`` from a ``tokenizer/`` folder, offline."""
    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(
            f"{folder}: tokenizer files {missing} (or tokenizer.json) are missing; a diffusers "
            f"tokenizer/ folder holds {list(TOKENIZER_FILES)} and tokenizer_config.json."
        )
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Prompts → int32 token ids [B, max_length] (start token, text, end token, padding).

    Prompts longer than ``max_length`` are truncated, as in diffusers' SD pipelines.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}.")
    length = max_length or tokenizer.model_max_length
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
    ).input_ids
    return np.asarray(ids, dtype=np.int32)
