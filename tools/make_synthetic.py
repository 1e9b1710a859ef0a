"""Thin script over `egm.data.synthetic.make_synthetic` (same as `egm make-synthetic`)."""

from jsonargparse import CLI

from egm.data.synthetic import make_synthetic

if __name__ == "__main__":
    for split, path in CLI(make_synthetic).items():
        print(f"{split}\t{path}")
