"""lmforge.io: one atomic-write policy for every file lmforge writes, one JSON/text reader; and one ``{field}``
template renderer shared by fine-tuning and evaluation."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import pytest

import lmforge
from lmforge import io
from lmforge.errors import LmforgeError
from lmforge.outputs import owned

SRC = Path(lmforge.__file__).parent


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_text_bytes_json_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    p = tmp_path / "sub" / "a.txt"  # the folder is created
    io.write_text_atomic(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    io.write_text_atomic(p, (f"{i}\n" for i in range(3)))
    assert p.read_text(encoding="utf-8") == "0\n1\n2\n"
    io.write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    io.write_json_atomic(tmp_path / "c.json", {"name": "café", "n": [1, 2]})
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "name": "café",\n  "n": [\n    1,\n    2\n  ]\n}\n'
    assert io.read_json(tmp_path / "c.json") == {"name": "café", "n": [1, 2]}
    assert _listing(tmp_path) == ["b.bin", "c.json", "sub"] and _listing(tmp_path / "sub") == ["a.txt"]


def test_files_get_the_usual_permissions_not_tempfiles_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        io.write_text_atomic(tmp_path / "a.txt", "x")
        with io.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    p = tmp_path / "summary.json"
    p.write_text("old", encoding="utf-8")

    def pieces():
        yield "new, half"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.write_text_atomic(p, pieces())
    with pytest.raises(RuntimeError, match="writer failed"), io.atomic_path(p) as tmp:
        tmp.write_text("partial", encoding="utf-8")
        raise RuntimeError("writer failed")
    assert p.read_text(encoding="utf-8") == "old"
    assert _listing(tmp_path) == ["summary.json"]


def test_temporary_names_belong_to_the_writing_verb(tmp_path):
    """The output policy (lmforge.outputs) must count a temporary left by a crash as the verb's own file."""
    seen = []
    with io.atomic_path(tmp_path / "summary.json") as tmp:
        seen = [n for n in _listing(tmp_path)]
        tmp.write_text("{}", encoding="utf-8")
    assert len(seen) == 1 and re.fullmatch(r"\.summary\.json\..+\.tmp", seen[0])
    assert owned(seen[0], "eval")
    with io.atomic_path(tmp_path / "model.safetensors") as tmp:
        assert owned(tmp.name, "merge")


def test_durability_file_fsynced_before_the_rename_folder_after(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(io, "fsync_file", lambda p: events.append(("file", Path(p).parent)))
    monkeypatch.setattr(io, "fsync_dir", lambda p: events.append(("dir", Path(p))))
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append(("replace", Path(b))), real_replace(a, b)))
    io.write_json_atomic(tmp_path / "x.json", [1])
    assert events == [("file", tmp_path), ("replace", tmp_path / "x.json"), ("dir", tmp_path)]


def test_write_json_atomic_takes_the_path_first():
    with pytest.raises(TypeError, match="path must be"):
        io.write_json_atomic({"a": 1}, "x.json")  # the old checkpoints.hf order


def test_readers_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad\.json: not valid JSON \(line 2, column 7"):
        io.read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    assert io.read_json(tmp_path / "list.json") == [1]
    with pytest.raises(LmforgeError, match=r"list\.json: expected a JSON object, got list"):
        io.read_json_object(tmp_path / "list.json")
    with pytest.raises(LmforgeError, match=r"missing\.json cannot be read"):
        io.read_json(tmp_path / "missing.json")
    with gzip.open(tmp_path / "z.json.gz", "wt", encoding="utf-8") as f:
        f.write('{"z": true}')
    assert io.read_json_object(tmp_path / "z.json.gz") == {"z": True}
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(LmforgeError, match=r"latin\.txt is not UTF-8 text \(byte 3\)"):
        io.read_text(tmp_path / "latin.txt")


def test_no_module_has_its_own_atomic_write():
    """Every file is written through lmforge.io: no other module makes temporary files and renames them over
    a destination (training/checkpoint.py renames whole checkpoint folders, which io does not do)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "io.py":
            continue
        text = path.read_text(encoding="utf-8")
        patterns = [r"mkstemp\(", r"\btmp\.replace\(", r"\.write_(text|bytes)\(.*\n\s*os\.replace"]
        if rel != "training/checkpoint.py":
            patterns.append(r"os\.replace\(")
        offenders += [f"{rel}: {p}" for p in patterns if re.search(p, text)]
    assert offenders == []


# ----------------------------------------------------------------------------- one {field} renderer
TEMPLATE = "Q: {question} ({n})\n{{literal}} {{{{x}}}}\nA:"


def _finetune_prompt(template: str, record: dict) -> str:
    from lmforge.data.sft import to_record

    return to_record(record, "d.jsonl, line 1", prompt_template=template, response_field="answer").plain_prompt


def _eval_prompt(template: str, record: dict) -> str:
    from lmforge.data.records import Record
    from lmforge.evaluation.data import FieldMap, query_text

    return query_text(Record(record, "d.jsonl, line 1"), FieldMap(template=template))


def test_finetune_and_eval_render_one_template_the_same_way():
    record = {"question": "what is {x}?", "n": 3, "answer": "y"}
    want = "Q: what is {x}? (3)\n{literal} {{x}}\nA:"  # {{ }} are literal braces; values are not parsed again
    assert _finetune_prompt(TEMPLATE, record) == _eval_prompt(TEMPLATE, record) == want


@pytest.mark.parametrize("template", ["Q: {missing} {{ok}}", "Q: {not a field}", "Q: {question"])
def test_finetune_and_eval_refuse_a_template_with_the_same_error(template):
    record = {"question": "q", "answer": "a"}
    errors = []
    for render in (_finetune_prompt, _eval_prompt):
        with pytest.raises(LmforgeError) as e:
            render(template, record)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "missing" in errors[0] or "placeholder" in errors[0] or "brace" in errors[0]
