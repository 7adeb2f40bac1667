from __future__ import annotations

import collections

import pytest

from lepton.protocol.imports import Allowlist, ImportPathError, resolve

ANY = Allowlist.anything()
MODELS = Allowlist(("lepton.models.*",))


def test_resolves_functions_classes_and_dotted_attributes() -> None:
    assert resolve("collections:OrderedDict", allow=ANY) is collections.OrderedDict
    assert resolve("collections:OrderedDict.fromkeys", allow=ANY)(["a"]) == {"a": None}
    assert resolve("lepton.models.digits:DigitsCNN", allow=MODELS).__name__ == "DigitsCNN"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("collections", "not a package.module:attr path"),
        (":OrderedDict", "not a package.module:attr path"),
        ("collections:", "not a package.module:attr path"),
        ("collections:Ordered Dict", "not a package.module:attr path"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
        ("tests.protocol.raises_on_import:f", "no sensor attached"),
        ("collections:NoSuchThing", "not found"),
        ("collections:OrderedDict.nope", "not found"),
        ("math:pi", "is not callable"),
    ],
)
def test_refuses_with_a_reason(path: str, reason: str) -> None:
    with pytest.raises(ImportPathError, match=reason):
        resolve(path, allow=ANY)
    assert issubclass(ImportPathError, ValueError)


@pytest.mark.parametrize(
    "path",
    [
        "os:abort",  # not in the list: refused before the module is imported
        "tests.protocol.raises_on_import:f",
        "lepton.models.digits:torch.load",  # a walk through a module the allowed one imports
        "lepton.models.digits:nn.Module",
        "modelsx.digits:DigitsCNN",  # a prefix of the pattern is not the package
    ],
)
def test_the_allowlist_refuses_before_importing(path: str) -> None:
    with pytest.raises(ImportPathError) as info:
        resolve(path, allow=MODELS)
    assert info.value.reason == "not_allowed"


def test_a_callable_re_exported_from_an_allowed_module_is_refused() -> None:
    # models.data imports names from other modules; allowing models.data must allow only
    # what it defines itself.
    import lepton.models.data

    assert hasattr(lepton.models.data, "dataclass")
    with pytest.raises(ImportPathError, match="defined in 'dataclasses'"):
        resolve("lepton.models.data:dataclass", allow=Allowlist(("lepton.models.data:*",)))


@pytest.mark.parametrize(
    ("patterns", "path", "ok"),
    [
        (("lepton.models.digits:DigitsCNN",), "lepton.models.digits:DigitsCNN", True),
        (("lepton.models.digits:DigitsCNN",), "lepton.models.digits:build_digits_cnn", False),
        (("lepton.models.digits:*",), "lepton.models.digits:build_digits_cnn", True),
        (("lepton.models.digits",), "lepton.models.digits:build_digits_cnn", True),
        (("lepton.models.digits",), "lepton.models.data:digits_splits", False),
        (("lepton.models.*",), "lepton.models:anything", True),
        ((), "lepton.models.digits:DigitsCNN", False),
    ],
)
def test_patterns(patterns: tuple[str, ...], path: str, ok: bool) -> None:
    assert Allowlist(patterns).permits(path) is ok


@pytest.mark.parametrize("bad", ["os:*:*", "a b", "", "x.*.y"])
def test_malformed_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="allowlist pattern"):
        Allowlist((bad,))
