"""Writes syntaxes/nemo.tmLanguage.json from the language's own lists, so the highlighting cannot drift.

    python editors/vscode/build_grammar.py          # rewrites the grammar; tests/test_editors.py compares

Keywords come from grammar/nemo.lark (its quoted words: `import`, `after`), block kinds, field names and
call functions from nemoc.dsl.schema, units from its UNITS table. Everything else (strings, numbers,
comments, calls, lists, arithmetic) follows the terminals of grammar/nemo.lark.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "syntaxes" / "nemo.tmLanguage.json"
NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*"


def keywords() -> list[str]:
    """The grammar's keywords: its quoted literal words (`"import"`, `"after"`)."""
    from importlib import resources

    lark = resources.files("nemoc.grammar").joinpath("nemo.lark").read_text(encoding="utf-8")
    text = "\n".join(line.split("//")[0] for line in lark.splitlines())
    return sorted(set(re.findall(r'"([a-z]+)"', text)))


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


def grammar() -> dict:
    from nemoc.dsl.schema import BLOCKS, CALLS, STAGE_PARAMS, UNITS

    fields = {f.name for b in BLOCKS.values() for f in b.fields} | {f.name for p in STAGE_PARAMS.values() for f in p}
    args = {f.name for a in CALLS.values() for f in a}
    units = {s for table in UNITS.values() for s in table if s}
    words = keywords()
    assert words == ["after", "import"], words  # the two keywords the patterns below place
    number = r"(?<![A-Za-z0-9_.])((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    return {
        "$schema": "https://raw.githubusercontent.com/martinring/tmlanguage/master/tmlanguage.json",
        "name": "nemo",
        "scopeName": "source.nemo",
        "fileTypes": ["nemo"],
        "patterns": [{"include": "#comment"}, {"include": "#import"}, {"include": "#block"},
                     {"include": "#field"}, {"include": "#value"}, {"include": "#punctuation"}],
        "repository": {
            "comment": {"name": "comment.line.number-sign.nemo", "match": "#.*$"},
            "import": {"match": r"^\s*(import)\b", "captures": {"1": {"name": "keyword.control.import.nemo"}}},
            "block": {
                "comment": "KIND [NAME] [after A, B] {   (block kinds: nemoc.dsl.schema.BLOCKS)",
                "match": rf"\b({_alt(BLOCKS)})\b(?:\s+({NAME}))?(?:\s+(after)\b([^{{#]*))?(?=\s*\{{)",
                "captures": {"1": {"name": "storage.type.block.nemo"}, "2": {"name": "entity.name.section.nemo"},
                             "3": {"name": "keyword.control.after.nemo"},
                             "4": {"patterns": [{"match": NAME, "name": "variable.other.reference.nemo"}]}},
            },
            "field": {
                "comment": "NAME = (known fields and call arguments: nemoc.dsl.schema)",
                "patterns": [
                    {"match": rf"\b({_alt(fields | args)})\s*(=)",
                     "captures": {"1": {"name": "support.type.property-name.nemo"},
                                  "2": {"name": "keyword.operator.assignment.nemo"}}},
                    {"match": rf"\b({NAME})\s*(=)",
                     "captures": {"1": {"name": "variable.other.property.nemo"},
                                  "2": {"name": "keyword.operator.assignment.nemo"}}},
                ],
            },
            "value": {"patterns": [{"include": "#comment"}, {"include": "#string"}, {"include": "#number"},
                                   {"include": "#call"}, {"include": "#list"}, {"include": "#constant"},
                                   {"include": "#operator"}, {"include": "#word"}]},
            "string": {
                "name": "string.quoted.double.nemo", "begin": '"', "end": r'"|$',
                "patterns": [{"match": r"\\.", "name": "constant.character.escape.nemo"}],
            },
            "number": {
                "comment": "a number and its unit (nemoc.dsl.schema.UNITS); another suffix is an error",
                "patterns": [
                    {"match": rf"{number}({_alt(units)})?(?![A-Za-z0-9_/%])",
                     "captures": {"1": {"name": "constant.numeric.nemo"}, "2": {"name": "keyword.other.unit.nemo"}}},
                    {"match": rf"{number}([A-Za-z]+(?:/[A-Za-z]+)?)",
                     "captures": {"1": {"name": "constant.numeric.nemo"}, "2": {"name": "invalid.illegal.unit.nemo"}}},
                ],
            },
            "call": {
                "comment": "NAME( args )   (functions: nemoc.dsl.schema.CALLS)",
                "begin": rf"\b({NAME})\s*(\()", "end": r"\)",
                "beginCaptures": {"1": {"patterns": [{"match": rf"^(?:{_alt(CALLS)})$", "name": "support.function.nemo"},
                                                     {"match": ".+", "name": "entity.name.function.nemo"}]},
                                  "2": {"name": "punctuation.parenthesis.begin.nemo"}},
                "endCaptures": {"0": {"name": "punctuation.parenthesis.end.nemo"}},
                "patterns": [{"include": "#field"}, {"include": "#value"}, {"include": "#punctuation"}],
            },
            "list": {
                "begin": r"\[", "end": r"\]",
                "beginCaptures": {"0": {"name": "punctuation.section.brackets.begin.nemo"}},
                "endCaptures": {"0": {"name": "punctuation.section.brackets.end.nemo"}},
                "patterns": [{"include": "#value"}, {"include": "#punctuation"}],
            },
            "constant": {"match": r"\b(true|false|auto)\b", "name": "constant.language.nemo"},
            "operator": {"match": r"[+\-*/]", "name": "keyword.operator.arithmetic.nemo"},
            "word": {"match": NAME, "name": "variable.other.constant.nemo"},
            "punctuation": {"patterns": [{"match": r"[{}]", "name": "punctuation.section.block.nemo"},
                                         {"match": ",", "name": "punctuation.separator.comma.nemo"}]},
        },
    }


def render() -> str:
    return json.dumps(grammar(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
