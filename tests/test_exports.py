"""The public names of statecast (PEP 562 lazy exports) all resolve."""

from __future__ import annotations

import pytest

import statecast
import statecast.client
import statecast.errors


def test_every_export_resolves() -> None:
    for name in statecast.__all__:
        assert getattr(statecast, name) is not None, name


def test_exports_and_the_lazy_table_agree() -> None:
    assert set(statecast.__all__) == {*statecast._EXPORTS, "__version__"}
    assert sorted(dir(statecast)) == sorted(statecast.__all__)


def test_every_error_class_is_exported() -> None:
    for name in statecast.errors.__all__:
        if name[0].isupper() and name != "ERRORS_BY_CODE":
            assert getattr(statecast, name) is getattr(statecast.errors, name)


def test_client_exports() -> None:
    for name in statecast.client.__all__:
        assert getattr(statecast.client, name) is not None, name
    assert statecast.client.Client is statecast.Client


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        statecast.NoSuchThing  # noqa: B018
