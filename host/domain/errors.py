"""The one exception of the Domain part."""

from __future__ import annotations

from host.errors import Category, PtmigError


class DomainModelError(PtmigError, ValueError):
    """XML or a model value that ptmig cannot use; the message says which and why.

    Every parser and constructor in host.domain raises only this for bad input,
    whatever the input is, so callers need one except clause for untrusted XML.
    """

    category = Category.INVALID


class UnknownName(DomainModelError, LookupError):
    """No team, device or pool of that name (a face answers "not found")."""

    category = Category.NOT_FOUND


def shown(value: object) -> str:
    """A value for an error message, cut short: hostile input can be megabytes."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
