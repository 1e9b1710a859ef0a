#!/usr/bin/env python
"""Thin script over `egm.curation.failures.analyze_failures` (same as `egm analyze-failures`); see its docstring or `--help`."""

import json

from jsonargparse import auto_cli

from egm.curation.failures import analyze_failures

if __name__ == "__main__":
    print(json.dumps(auto_cli(analyze_failures, as_positional=False), indent=2))
