"""docs/architecture.md agrees with the code: every Note it indexes is written in the file it
names, every Note the code writes is indexed, and its wire table lists each request's fields
and each reply's type and fields as faastube/protocol.py defines them."""

import dataclasses
import re
from pathlib import Path

from faastube import protocol

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
CODE = [p for package in ("faastube", "controller", "shim") for p in (ROOT / package).rglob("*")
        if p.suffix in (".py", ".c")]
# A Note is written where a line starts with it and a colon follows ("Note [Shares]: …").
WRITTEN = re.compile(r'^\s*(?:#\s*|"""|/?\*\s*)?Note \[([^\]]+)\]:', re.MULTILINE)


def notes_table() -> dict[str, str]:
    section = ARCHITECTURE.split("## Invariants", 1)[1].split("\n## ", 1)[0]
    return {name: path for name, path in re.findall(r"^\| ([^|]+?) \| `([^`]+)` \|", section, re.MULTILINE)
            if name != "note"}


def test_every_note_the_document_indexes_is_written_in_the_file_it_names():
    table = notes_table()
    assert len(table) > 30
    missing = {name: path for name, path in table.items()
               if name not in WRITTEN.findall((ROOT / path).read_text())}
    assert missing == {}


def test_every_note_the_code_writes_is_indexed_and_written_once():
    written = [(name, path.relative_to(ROOT).as_posix()) for path in CODE for name in WRITTEN.findall(path.read_text())]
    names = [name for name, _path in written]
    assert sorted(set(names) - set(notes_table())) == []
    assert sorted({n for n in names if names.count(n) > 1}) == []


def wire_table() -> dict[str, tuple[str, str]]:
    section = ARCHITECTURE.split("## The wire protocol", 1)[1].split("\n## ", 1)[0]
    return {op: (fields, reply) for op, fields, reply in
            re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", section, re.MULTILINE)}


def test_the_wire_table_lists_every_request_with_its_fields():
    table = wire_table()
    assert set(table) == set(protocol.REQUESTS)
    for op, cls in protocol.REQUESTS.items():
        named = re.findall(r"`(\w+)(\??)`", table[op][0])
        expected = [(f.name, "" if f.default is dataclasses.MISSING else "?") for f in dataclasses.fields(cls)]
        assert named == expected, op


def test_the_wire_table_names_each_replys_type_and_fields():
    for op, cls in protocol.REQUESTS.items():
        reply = protocol.REPLIES[cls]
        text = wire_table()[op][1]
        assert text.split(":")[0].split(" ")[0].strip("`") == reply.__name__, op
        listed = re.findall(r"`(\w+)`", text)[1:]
        if listed:                  # a reply named again ("as Granted") need not list its fields again
            assert listed == [f.name for f in dataclasses.fields(reply)], op
