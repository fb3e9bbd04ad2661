"""The workflow's own errors, below every workflow module so that each can raise them."""

from __future__ import annotations

from host.errors import Category, PtmigError


class WorkflowError(PtmigError, RuntimeError):
    """A workflow cannot go on; the message says why in the user's terms."""


class PreflightError(WorkflowError):
    """Refused before anything changed."""

    category = Category.REFUSED
