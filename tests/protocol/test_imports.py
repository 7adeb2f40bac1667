from __future__ import annotations

import collections

import pytest

from protocol.imports import ImportPathError, resolve


def test_resolves_functions_classes_and_dotted_attributes() -> None:
    assert resolve("collections:OrderedDict") is collections.OrderedDict
    assert resolve("collections:OrderedDict.fromkeys")(["a"]) == {"a": None}
    assert resolve("models.digits:DigitsCNN").__name__ == "DigitsCNN"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("collections", "not a package.module:attr path"),
        (":OrderedDict", "not a package.module:attr path"),
        ("collections:", "not a package.module:attr path"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
        ("tests.protocol.raises_on_import:f", "no sensor attached"),
        ("collections:NoSuchThing", "not found"),
        ("collections:OrderedDict.nope", "not found"),
        ("math:pi", "is not callable"),
    ],
)
def test_refuses_with_a_reason(path: str, reason: str) -> None:
    with pytest.raises(ImportPathError, match=reason):
        resolve(path)
    assert issubclass(ImportPathError, ValueError)
