"""Prompt sources: text, JSONL, CSV, parquet and locally prepared tensorflow-datasets captions."""

from __future__ import annotations

import json

import pytest

from instaflow_jax.data.prompts import PromptSource, PromptSourceError, load_prompts, prompts_digest

PROMPTS = ["a red circle", "a blue  square ", "a red circle", "", "a cat", "a dog"]
EXPECTED = ["a red circle", "a blue square", "a cat", "a dog"]  # stripped, blank dropped, deduped


def _write(tmp_path, kind):
    if kind == "text":
        path = tmp_path / "p.txt"
        path.write_text("\n".join(PROMPTS) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("\n".join(json.dumps({"caption": p, "id": i}) for i, p in enumerate(PROMPTS)))
    elif kind == "csv":
        path = tmp_path / "p.csv"
        lines = ["id,caption"] + [f'{i},"{p}"' for i, p in enumerate(PROMPTS)]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "p.parquet"
        pq.write_table(pa.table({"caption": PROMPTS, "id": list(range(len(PROMPTS)))}), path)
    return str(path)


@pytest.mark.parametrize("kind", ["text", "jsonl", "csv", "parquet"])
def test_file_sources(tmp_path, kind):
    source = PromptSource(kind=kind, path=_write(tmp_path, kind), column="caption")
    assert load_prompts(source) == EXPECTED
    assert load_prompts(PromptSource(kind=kind, path=source.path, column="caption", dedupe=False))[:3] == [
        "a red circle",
        "a blue square",
        "a red circle",
    ]
    assert load_prompts(PromptSource(kind=kind, path=source.path, column="caption", limit=2)) == EXPECTED[:2]


def test_tfds_captions_prepared_locally(tmp_path):
    from instaflow_jax.testing import write_mock_tfds_captions

    write_mock_tfds_captions(
        str(tmp_path), {"train": [["a cat", "a small cat"], ["a dog"]], "validation": [["a horse"]]}
    )
    source = PromptSource(kind="tfds", path=str(tmp_path), name="coco_captions", split="train")
    assert load_prompts(source) == ["a cat", "a small cat", "a dog"]
    assert load_prompts(PromptSource(kind="tfds", path=str(tmp_path), split="validation")) == ["a horse"]
    with pytest.raises(PromptSourceError, match="no split 'test'"):
        load_prompts(PromptSource(kind="tfds", path=str(tmp_path), split="test"))
    with pytest.raises(
        PromptSourceError, match=r"no prepared tensorflow-datasets dataset 'laion'.*tfds build"
    ):
        load_prompts(PromptSource(kind="tfds", path=str(tmp_path), name="laion"))


def test_order_and_digest_are_deterministic(tmp_path):
    source = PromptSource(kind="text", path=_write(tmp_path, "text"))
    assert prompts_digest(load_prompts(source)) == prompts_digest(load_prompts(source))
    assert prompts_digest(["a", "b"]) != prompts_digest(["b", "a"])


@pytest.mark.parametrize(
    "make, kind, message",
    [
        (lambda p: p / "missing.txt", "text", "does not exist"),
        (lambda p: (p / "empty.txt").write_text("\n \n") and p / "empty.txt", "text", "yielded no prompts"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00\xc3") and p / "bin.txt", "text", "UTF-8"),
        (lambda p: (p / "a.csv").write_text("id,text\n1,hi\n") and p / "a.csv", "csv", "no column 'caption'"),
        (
            lambda p: (p / "a.jsonl").write_text('{"x": 1}\n') and p / "a.jsonl",
            "jsonl",
            "no column 'caption'",
        ),
        (lambda p: (p / "b.jsonl").write_text("{oops\n") and p / "b.jsonl", "jsonl", "line 1 is not JSON"),
    ],
)
def test_bad_sources_say_what_is_wrong(tmp_path, make, kind, message):
    source = PromptSource(kind=kind, path=str(make(tmp_path)), column="caption")
    with pytest.raises(PromptSourceError, match=message):
        load_prompts(source)


def test_unknown_kind_and_keys():
    with pytest.raises(PromptSourceError, match="unknown prompt source kind 'xml'"):
        load_prompts(PromptSource(kind="xml", path="x"))
    with pytest.raises(PromptSourceError, match=r"unknown prompt-source keys \['colum'\]"):
        PromptSource.from_config({"kind": "csv", "colum": "x"})
