"""The README describes the code as it stands: every module in its Layout section, and its config
excerpts taken from the shipped files."""

from __future__ import annotations

import re

from helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).rstrip()


def test_layout_lists_every_module_and_nothing_else():
    block = re.search(r"```\n(.*?)```", _section("Layout"), re.S).group(1)
    listed, folder = set(), None
    for line in block.splitlines():
        top = re.match(r"^(\S+/)", line)
        if top:
            folder = top.group(1)
            continue
        entry = re.match(r"^  (\S+\.py|\S+/)\s", line + " ")
        if entry and folder:
            listed.add(folder + entry.group(1))
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "charlm").rglob("*.py") if p.name != "__init__.py"}
    shipped |= {str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")}
    shipped |= {str(p.relative_to(ROOT)) for p in (ROOT / "charlm").iterdir() if p.is_dir() and p.name != "__pycache__"}
    shipped = {s + "/" if (ROOT / s).is_dir() else s for s in shipped}
    assert listed == shipped, f"missing from README: {sorted(shipped - listed)}; gone from the code: {sorted(listed - shipped)}"


def test_config_excerpts_match_the_shipped_files():
    blocks = re.findall(r"```ya?ml\n# (\S+\.ya?ml)( \(abridged\))?\n(.*?)```", README, re.S)
    assert len(blocks) >= 2, "the README shows an experiment and a sweep file"
    for name, abridged, body in blocks:
        shipped = [_strip_comment(x) for x in (ROOT / name).read_text(encoding="utf-8").splitlines()]
        shown = [_strip_comment(x) for x in body.splitlines()]
        shown = [x for x in shown if x and not x.lstrip().startswith("#")]
        if abridged:  # every line shown is a line of the file, in the file's order
            it = iter(shipped)
            missing = [x for x in shown if not any(x == y for y in it)]
            assert not missing, f"README's {name} excerpt differs from the file at: {missing[0]!r}"
        else:
            assert shown == [x for x in shipped if x and not x.lstrip().startswith("#")], f"README's {name} is not the file"
