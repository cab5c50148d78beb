"""`python -m gradcomp [compressors|memories|syncs|recipes|check SPEC]`: list what is registered, as Markdown."""
from __future__ import annotations

import sys

from gradcomp import registry


def _doc_line(cls) -> str:
    doc = (cls.__module__ and sys.modules[cls.__module__].__doc__) or cls.__doc__ or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.split(":", 1)[1].strip() if first.startswith("`") and ":" in first else first


def table(kind: str) -> str:
    rows = []
    for name in registry.available(kind):
        try:
            cls = registry.lookup(kind, name)
        except Exception as e:  # a module that fails to import is shown, not hidden
            rows.append(f"| `{name}` | (import failed: {e}) | | |")
            continue
        params = ", ".join(f"`{k}`={p.default} ({p.describe()})" for k, p in cls.params.items()) or "-"
        if kind == "compressor":
            rows.append(f"| `{name}` | {params} | {'yes' if cls.summable else 'no'} | {cls.paper or _doc_line(cls)} |")
        else:
            rows.append(f"| `{name}` | {params} | {_doc_line(cls)} |")
    head = ("| name | parameters (default, range) | summable | paper |\n|---|---|---|---|" if kind == "compressor"
            else "| name | parameters (default, range) | what |\n|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else "compressors"
    kinds = {"compressors": "compressor", "memories": "memory", "syncs": "sync"}
    if what in kinds:
        print(table(kinds[what]))
        return 0
    if what == "recipes":
        from gradcomp import recipes
        print(recipes.table())
        print()
        print(recipes.lm_table())
        return 0
    if what == "check" and len(argv) == 2:
        print(registry.create(argv[1]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
