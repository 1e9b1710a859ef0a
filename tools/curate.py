#!/usr/bin/env python
"""Thin script over `egm.curation.jobs.curate` (same as `egm curate`); see its docstring or `--help`."""

import json

from jsonargparse import auto_cli

from egm.curation.jobs import curate

if __name__ == "__main__":
    print(json.dumps(auto_cli(curate, as_positional=False), indent=2))
