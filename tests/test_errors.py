"""What the command reports as a user error (egm.errors), on jsonargparse's real exceptions."""

from __future__ import annotations

import argparse

import pytest
from jsonargparse import ArgumentParser

from egm.config_checks import check_ranges
from egm.data.manifest import ManifestError
from egm.errors import InputError, describe, find_user_error


class Shape:
    """A class the parser instantiates (subclass mode: ``class_path`` + ``init_args``)."""

    def __init__(self, side: int = 1):
        if side < 1:
            raise InputError(f"Shape: side must be >= 1, got {side}")
        self.side = side


SHAPE = f"{Shape.__module__}.Shape"


def _parse_error(*args: str) -> argparse.ArgumentError:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--n", type=int)
    p.add_subclass_arguments(Shape, "shape", required=False)
    with pytest.raises(argparse.ArgumentError) as e:
        p.parse_args(list(args))
    return e.value


def test_parse_errors_name_the_key_and_the_reason():
    assert describe(_parse_error("--n", "abc")) == "Parser key \"n\": Expected a <class 'int'>. Got value: abc"
    # subclass mode: the Union listing is dropped, the class_path header kept
    msg = describe(_parse_error("--shape", SHAPE, "--shape.init_args.bogus", "3"))
    assert msg == f"Parser key \"shape\": Problem with given class_path '{SHAPE}': Option 'bogus' is not accepted"
    assert describe(_parse_error("--frob", "1")) == "unrecognized arguments: --frob 1"


def test_an_init_error_is_found_behind_jsonargparse_union_error():
    """Instantiation wraps the __init__'s error in "Does not validate against any of the Union
    subtypes" (a plain ValueError, no user error itself) raised from it."""
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--shape", type=Shape | None)
    cfg = p.parse_args(["--shape", SHAPE, "--shape.init_args.side", "0"])
    with pytest.raises(ValueError) as e:
        p.instantiate_classes(cfg)
    assert type(e.value) is ValueError and "Union subtypes" in str(e.value)
    found = find_user_error(e.value)
    assert isinstance(found, InputError) and describe(found) == "Shape: side must be >= 1, got 0"


def test_what_is_a_user_error():
    with pytest.raises(InputError) as e:
        check_ranges("SFTModule", {"lr": -1}, {"lr": "> 0"})
    assert find_user_error(e.value) is e.value
    assert isinstance(ManifestError("m.jsonl", 3, "box", "bad"), InputError)
    assert find_user_error(FileNotFoundError(2, "No such file", "x.json")) is not None
    for bug in (ValueError("not enough values to unpack"), TypeError("x"), KeyError("k"), RuntimeError("r")):
        assert find_user_error(bug) is None
    multi = InputError("REFER split sizes differ:\n  refcoco_unc_val: expressions = 1, expected 10834")
    assert describe(multi) == "REFER split sizes differ: refcoco_unc_val: expressions = 1, expected 10834"
