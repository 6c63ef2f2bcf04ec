"""benchmarks/common.py: the one RESULTS.md writer and the script ending every benchmark shares."""

from __future__ import annotations

import json

from benchmarks import common


def test_results_block_is_added_then_replaced_and_nothing_else_moves(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Reproduction\n\nkept as is\n")
    marks = ("<!-- performance:begin -->", "<!-- performance:end -->")
    common.replace_marked_block(md, "<!-- a:begin -->", "<!-- a:end -->", "table v1", "## Performance", marks)
    first = md.read_text()
    assert first.startswith("# Results\n\n## Reproduction\n\nkept as is\n\n## Performance\n\n")
    assert (
        "<!-- performance:begin -->\n<!-- a:begin -->\ntable v1\n<!-- a:end -->\n<!-- performance:end -->"
        in first
    )
    # A second block goes inside the same section, before its end mark; replacing one leaves the other alone.
    common.replace_marked_block(md, "<!-- b:begin -->", "<!-- b:end -->", "other", "## Performance", marks)
    common.replace_marked_block(md, "<!-- a:begin -->", "<!-- a:end -->", "table v2", "## Performance", marks)
    text = md.read_text()
    assert "table v1" not in text and text.count("table v2") == 1 and text.count("other") == 1
    assert text.index("table v2") < text.index("other") < text.index("<!-- performance:end -->")
    assert text.startswith("# Results\n\n## Reproduction\n\nkept as is\n")


def test_a_section_without_marks_gets_its_block_under_the_title(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# R\n\n## Toy\n\nprose\n\n## Next\n")
    common.replace_marked_block(md, "<!-- t:begin -->", "<!-- t:end -->", "rows", "## Toy")
    assert md.read_text() == "# R\n\n## Toy\n\n<!-- t:begin -->\nrows\n<!-- t:end -->\n\n\nprose\n\n## Next\n"


def test_finish_writes_the_json_only_when_asked_and_prints_the_table(tmp_path, capsys):
    result = {"ratio": 1.25}
    assert common.finish(result, None, "| a |") is result
    assert capsys.readouterr().out == "| a |\n" and not list(tmp_path.iterdir())
    common.finish(result, tmp_path / "r.json", None)
    assert json.loads((tmp_path / "r.json").read_text()) == result
