#!/usr/bin/env python
"""Thin script over `egm.curation.selection.select_rl_data` (same as `egm select-rl-data`); see its docstring or `--help`."""

import json

from jsonargparse import auto_cli

from egm.curation.selection import select_rl_data

if __name__ == "__main__":
    print(json.dumps(auto_cli(select_rl_data, as_positional=False), indent=2))
