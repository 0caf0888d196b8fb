"""The recipe keys as the markdown table docs/recipes/README.md holds: made from :mod:`.schema`, never by hand.

    python -m fastdfd.recipes.keys_doc                                  # print the table
    python -m fastdfd.recipes.keys_doc --write docs/recipes/README.md   # replace it between the markers

The tests check that the file's table is this one, so a setting added to :mod:`fastdfd.settings` shows there
after one run of the command above.
"""

from __future__ import annotations

from .schema import SECTIONS, TOP, is_required

BEGIN, END = "<!-- recipe keys: begin (python -m fastdfd.recipes.keys_doc --write FILE) -->", "<!-- recipe keys: end -->"


def keys_table() -> str:
    """Every recipe key as a markdown table (key, type with choices or bounds, optional or not, meaning), made
    from the schema's fields: docs/recipes/README.md holds it between ``BEGIN`` and ``END``."""
    rows = ["| key | type | meaning |", "|---|---|---|"]
    for key, spec in [*TOP.items(), *((f"{name}.{k}", f) for name, fields in SECTIONS.items() for k, f in fields.items())]:
        kind = spec.kind + (f" ({', '.join(spec.choices)})" if spec.choices else "")
        note = "" if is_required(spec) else f" Optional: absent means {spec.plain(spec.absent)!r}."
        rows.append(f"| `{key}` | {kind} | {spec.doc}.{note} |".replace("..", "."))
    return "\n".join(rows)


def write_keys_table(path: str) -> bool:
    """Replace the table between the markers in ``path``; True when the file changed."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{keys_table()}\n{END}{tail}"
    if new != text:
        p.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m fastdfd.recipes.keys_doc [--write docs/recipes/README.md]
    import sys

    if sys.argv[1:2] == ["--write"]:
        print("updated" if write_keys_table(sys.argv[2]) else "unchanged", sys.argv[2])
    else:
        print(keys_table())
