"""The public surface: what ``asgi_sqla`` exports, and the names it shows."""

from __future__ import annotations

import pickle

import pytest

import asgi_sqla


@pytest.mark.parametrize("name", asgi_sqla.__all__)
def test_every_public_class_shows_under_the_package_name(name: str) -> None:
    public = getattr(asgi_sqla, name)
    if isinstance(public, type):
        assert public.__module__ == "asgi_sqla"
        assert getattr(asgi_sqla, public.__qualname__) is public


def test_a_public_exception_reads_and_pickles_by_its_public_name() -> None:
    error = asgi_sqla.CommitFailedError("the commit failed")

    assert repr(type(error)) == "<class 'asgi_sqla.CommitFailedError'>"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is asgi_sqla.CommitFailedError
    assert str(again) == "the commit failed"
