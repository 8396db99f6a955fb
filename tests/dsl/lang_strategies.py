"""Hypothesis strategies: random well-formed `.nemo` text with random layout and comments."""

from __future__ import annotations

from hypothesis import strategies as st

WORDS = st.sampled_from(["tensor", "layers", "web", "x", "H100", "A100-80GB", "bf16", "lr", "data", "a_b", "stage"])
NUMBERS = st.sampled_from(["8", "0", "3e-4", "1.2T", "500M", "4K", "80GiB", "900GB/s", "24h", "30min", "90%",
                           "0.5", ".5", "1e9", "12"])
STRINGS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
SPACE = st.sampled_from([" ", "  ", "\n", " \n  ", "\t", "\r\n"])
COMMENT = st.sampled_from(["", "", "", " # note\n", "  # another: comment {\n", "\n# own line\n"])


def _gap(draw) -> str:
    return draw(SPACE) + draw(COMMENT) + draw(st.sampled_from(["", " "]))


def _value(draw, depth: int) -> str:
    choice = draw(st.integers(0, 9 if depth < 3 else 4))
    if choice <= 1:
        return draw(NUMBERS)
    if choice == 2:
        return draw(WORDS)
    if choice == 3:
        return draw(STRINGS)
    if choice == 4:
        return draw(st.sampled_from(["true", "false", "auto"]))
    if choice == 5:
        items = [_value(draw, depth + 1) for _ in range(draw(st.integers(0, 3)))]
        return "[" + ("," + _gap(draw)).join(items) + "]"
    if choice == 6:
        args = [f"{draw(WORDS)} = {_value(draw, depth + 1)}" for _ in range(draw(st.integers(0, 3)))]
        return f"{draw(WORDS)}(" + ", ".join(args) + ")"
    if choice == 7:
        return "-" + _value(draw, depth + 1)
    if choice == 8:
        return "(" + _value(draw, depth + 1) + ")"
    op = draw(st.sampled_from(["+", "-", "*", "/"]))
    return _value(draw, depth + 1) + f" {op} " + _value(draw, depth + 1)


def _block(draw, depth: int) -> str:
    head = draw(WORDS.filter(lambda w: w != "after"))
    if draw(st.booleans()):
        head += " " + draw(WORDS)
    if draw(st.booleans()):
        head += " after " + ", ".join(draw(st.lists(WORDS, min_size=1, max_size=2)))
    members = []
    for _ in range(draw(st.integers(0, 4))):
        if depth < 3 and draw(st.integers(0, 3)) == 0:
            members.append(_block(draw, depth + 1))
        else:
            members.append(f"{draw(WORDS)} ={draw(SPACE)}{_value(draw, 0)}")
    inner = "".join(_gap(draw) + m for m in members)
    return head + " {" + inner + _gap(draw) + "}"


@st.composite
def programs(draw) -> str:
    """A syntactically valid file (not necessarily a valid experiment)."""
    items = []
    for _ in range(draw(st.integers(0, 2))):
        items.append(f'import "{draw(st.sampled_from(["a.nemo", "common/x.nemo"]))}"')
    for _ in range(draw(st.integers(1, 3))):
        items.append(_block(draw, 0))
    return draw(COMMENT) + "".join(i + _gap(draw) for i in items) + draw(st.sampled_from(["", "\n"]))
