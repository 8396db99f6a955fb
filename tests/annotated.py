"""The annotated-source harness shared by the language and layout error tests.

A line that must carry a diagnostic has a marker comment `# error: E021 <regex of the message>` (or
`# warning: W001 ...`, `# note: W107 ...`; several markers may share a line). `mismatches` lists every missing, extra or
misplaced diagnostic; an empty list means the file's diagnostics are exactly its markers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MARKER = re.compile(r"#\s*(error|warning|note):\s*([EW]\d{3})\s*(.*?)\s*(?=#\s*(?:error|warning|note):|$)")


def markers(sources: Mapping[str, str]) -> list[tuple[str, int, str, str, str]]:
    """(path, line, severity, code, message regex) of every marker in `sources`."""
    return [(path, lineno, m.group(1), m.group(2), m.group(3))
            for path, text in sources.items() for lineno, line in enumerate(text.splitlines(), start=1)
            for m in MARKER.finditer(line)]


def mismatches(diagnostics: Iterable, sources: Mapping[str, str]) -> list[str]:
    """What differs between the diagnostics and the markers: 'missing ...' and 'unexpected ...' lines."""
    unmatched = list(diagnostics)
    problems = []
    for path, line, severity, code, regex in markers(sources):
        hit = next((d for d in unmatched if d.span and d.span.path == path and d.span.line == line
                    and d.code == code and d.severity.value == severity and re.search(regex, d.message)), None)
        if hit is None:
            problems.append(f"missing {severity} {code} /{regex}/ at {path}:{line}")
        else:
            unmatched.remove(hit)
    return problems + [f"unexpected {d.span}: {d.code} {d.message}" for d in unmatched]
