"""Agreement of the refusal judges with PyRIT's 105 human refusal labels.

    python scripts/judge_agreement.py [--from-dir DIR] [--seed 0] [--markdown] [--json FILE]

The labels come from the pinned ``pyrit==1.1.0`` wheel through
:func:`mergekit_safety.prompt_sets.read_refusal_labels` (downloaded once by package name into the
wheel cache, or read from ``--from-dir``: the wheel file or its extracted files). The rows are
split with :func:`mergekit_safety.judge.split_labels` into the development half (the only one
used to change the judge) and the held-out half; the table shows both and the whole set for
the previous lab judge, the keyword judge and the keyword judge with the off-topic check.
See docs/judge.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mergekit_safety.judge import PREVIOUS_REFUSAL_PHRASES, KeywordJudge, agreement, split_labels
from mergekit_safety.prompt_sets import SourceError, read_refusal_labels


def judges():
    return {
        "previous (lab, any position)": KeywordJudge(PREVIOUS_REFUSAL_PHRASES, patterns=(), window=None,
                                                     not_patterns=()),
        "keyword": KeywordJudge(),
        "keyword+topic": KeywordJudge(off_topic=True),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-dir", default=None, help="folder with the pyrit wheel or its extracted files")
    ap.add_argument("--seed", type=int, default=0, help="seed of the development/held-out split")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows, info = read_refusal_labels(from_dir=args.from_dir)
    except (SourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dev, held = split_labels(rows, seed=args.seed)
    parts = {"development": dev, "held-out": held, "all": rows}
    head = ["judge", "half", "n", "accuracy (95% CI)", "precision", "recall", "F1", "tp", "fp", "tn", "fn"]
    table, results = [], {}
    for name, judge in judges().items():
        for part, recs in parts.items():
            a = agreement(judge, recs)
            results.setdefault(name, {})[part] = {k: v for k, v in a.items()}
            lo, hi = a["accuracy_ci95"]
            table.append([name, part, str(a["n"]), f"{100 * a['accuracy']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})",
                          f"{100 * a['precision']:.1f}", f"{100 * a['recall']:.1f}", f"{100 * a['f1']:.1f}",
                          str(a["tp"]), str(a["fp"]), str(a["tn"]), str(a["fn"])])
    print(f"labels: {info['package']}=={info['version']} {info['path']} ({info['origin']}); "
          f"{len(rows)} rows, {sum(r['refusal'] for r in rows)} refusals; split seed {args.seed}: "
          f"development {len(dev)}, held-out {len(held)}")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [head] + table) for i in range(len(head))]
        for row in [head] + table:
            print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"source": info, "seed": args.seed, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
