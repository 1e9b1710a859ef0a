"""Tables 3/4, the Figure 4 plot, IoU histograms and qualitative panels from evaluation folders.

    python tools/eval_report.py '[runs/egm-qwen3vl-2b, runs/qwen3vl-2b-thinking]' --out_dir reports --qualitative 4

Thin wrapper over :func:`egm.eval.report.make_report` (its signature is the CLI schema).
"""

from __future__ import annotations

from jsonargparse import auto_cli

from egm.eval.report import make_report


def main() -> None:
    written = auto_cli(make_report)
    for name, path in sorted(written.items()):
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
