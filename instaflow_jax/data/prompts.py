"""Prompt sources for teacher-data generation, read in a deterministic order.

Sources (``PromptSource.kind``):
  * ``text``: one prompt per line (blank lines skipped);
  * ``jsonl`` / ``csv`` / ``parquet``: the string column ``column`` (parquet needs pyarrow);
  * ``tfds``: a tensorflow-datasets dataset *prepared locally* (array_record files, read without
    TensorFlow), e.g. ``coco_captions``: ``field`` names the text feature (``captions/text``),
    every caption of a list is a prompt.
Prompts are stripped; ``dedupe`` keeps the first occurrence; ``limit`` keeps the first N.
Paths may be local or ``etils.epath`` (``gs://…``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath

KINDS = ("text", "jsonl", "csv", "parquet", "tfds")


class PromptSourceError(ValueError):
    """A prompt source that cannot be read or yields no prompts."""


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """Where prompts come from. ``path`` is a file (or, for tfds, a ``data_dir``)."""

    kind: str = "text"
    path: str = ""
    column: str = "prompt"  # jsonl / csv / parquet
    name: str = "coco_captions"  # tfds dataset name (with optional "/config")
    split: str = "train"  # tfds split
    field: str = "captions/text"  # tfds feature path of the text
    dedupe: bool = True
    limit: int = 0  # 0 = all

    @classmethod
    def from_config(cls, config: Any) -> PromptSource:
        """From an ml_collections ConfigDict or a dict with the same keys."""
        items = dict(config.items()) if hasattr(config, "items") else dict(config)
        unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PromptSourceError(f"unknown prompt-source keys {sorted(unknown)}.")
        return cls(**items)

    def describe(self) -> str:
        where = f"{self.name}:{self.split} in {self.path}" if self.kind == "tfds" else self.path
        return f"{self.kind} {where}" + (
            f" [{self.column}]" if self.kind in ("jsonl", "csv", "parquet") else ""
        )


def _read_text(path: epath.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise PromptSourceError(f"prompt file {path} does not exist.") from err
    except (UnicodeDecodeError, OSError) as err:
        raise PromptSourceError(f"prompt file {path} cannot be read as UTF-8 text: {err}.") from err


def _column(rows: Iterator[dict], column: str, where: str) -> Iterator[str]:
    for number, row in enumerate(rows, 1):
        if column not in row:
            raise PromptSourceError(f"{where}: row {number} has no column {column!r} (it has {sorted(row)}).")
        value = row[column]
        if value is not None:
            yield str(value)


def _jsonl(path: epath.Path, column: str) -> Iterator[str]:
    def rows():
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptSourceError(f"{path}: line {number} is not JSON ({err}).") from err

    return _column(rows(), column, str(path))


def _csv(path: epath.Path, column: str) -> Iterator[str]:
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise PromptSourceError(f"{path}: no column {column!r}; the header is {reader.fieldnames}.")
    return _column(reader, column, str(path))


def _parquet(path: epath.Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise PromptSourceError("reading parquet needs pyarrow: pip install pyarrow.") from err
    try:
        table = pq.read_table(io.BytesIO(path.read_bytes()), columns=[column])
    except FileNotFoundError as err:
        raise PromptSourceError(f"prompt file {path} does not exist.") from err
    except Exception as err:  # pyarrow raises its own error types
        raise PromptSourceError(f"{path}: cannot read column {column!r} from parquet ({err}).") from err
    return (str(v) for v in table.column(column).to_pylist() if v is not None)


def prepared_tfds_folder(data_dir: epath.Path, name: str) -> epath.Path:
    """The prepared dataset folder ``data_dir/name[/config]/<latest version>``."""
    base = data_dir / name
    if not base.exists():
        raise PromptSourceError(
            f"no prepared tensorflow-datasets dataset {name!r} under {data_dir}. Prepare it once "
            f"where there is network (e.g. `tfds build {name.split('/')[0]} --data_dir {data_dir} "
            "--file_format array_record`) and point path at that data_dir."
        )
    if (base / "dataset_info.json").exists():
        return base
    # name/version or name/config/version (glob one level at a time: no ** on buckets)
    candidates = sorted(
        p.parent for pattern in ("*/dataset_info.json", "*/*/dataset_info.json") for p in base.glob(pattern)
    )
    if not candidates:
        raise PromptSourceError(f"{base} holds no prepared version (no dataset_info.json).")
    return candidates[-1]  # the highest version (and the first config when several exist)


def _tfds(source: PromptSource) -> Iterator[str]:
    import tensorflow_datasets as tfds

    folder = prepared_tfds_folder(epath.Path(source.path), source.name)
    builder = tfds.builder_from_directory(folder)
    if source.split not in builder.info.splits:
        raise PromptSourceError(f"{folder}: no split {source.split!r}; it has {list(builder.info.splits)}.")
    records = builder.as_data_source(split=source.split)
    for number in range(len(records)):
        value: Any = records[number]
        for key in source.field.split("/"):
            if not isinstance(value, dict) or key not in value:
                raise PromptSourceError(f"{folder}: record {number} has no field {source.field!r}.")
            value = value[key]
        for text in value if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) else [value]:
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def iter_raw(source: PromptSource) -> Iterator[str]:
    """The source's prompts in file order, before stripping, de-duplication and limits."""
    if source.kind not in KINDS:
        raise PromptSourceError(f"unknown prompt source kind {source.kind!r}; expected one of {KINDS}.")
    if not source.path:
        raise PromptSourceError(f"the {source.kind} prompt source needs a path.")
    if source.kind == "tfds":
        return _tfds(source)
    path = epath.Path(os.path.expanduser(source.path))
    if source.kind == "text":
        return iter(_read_text(path).splitlines())
    return {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[source.kind](path, source.column)


def load_prompts(source: PromptSource) -> list[str]:
    """All prompts of ``source`` in deterministic order; raises if there are none."""
    prompts, seen = [], set()
    for raw in iter_raw(source):
        prompt = " ".join(raw.split())
        if not prompt or (source.dedupe and prompt in seen):
            continue
        seen.add(prompt)
        prompts.append(prompt)
        if source.limit and len(prompts) >= source.limit:
            break
    if not prompts:
        raise PromptSourceError(f"the prompt source ({source.describe()}) yielded no prompts.")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    """sha256 of the prompt list, recorded in manifests to detect a changed source on resume."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\n")
    return digest.hexdigest()
