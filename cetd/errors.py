"""The cetd error hierarchy.

Every expected failure is one of these, carrying a sentence meant for the user. The CLI prints
``str(error)`` on one line and exits with ``error.exit_code``; anything else is a bug.
"""

from __future__ import annotations


class CetdError(Exception):
    """Base class: an expected failure, explained in one sentence."""

    exit_code = 1


class ConfigError(CetdError):
    """The configuration file or a command-line option is invalid."""

    exit_code = 78  # EX_CONFIG


class IdentityError(CetdError):
    """Keys, certificates or the state directory are missing, unreadable or inconsistent."""

    exit_code = 77  # EX_NOPERM


class TokenError(IdentityError):
    """A join token is malformed, expired, already used or belongs to another household."""


class NotAuthorizedError(CetdError):
    """A peer or client is not (or no longer) a member of the household."""

    exit_code = 77


class StaleTermError(CetdError):
    """A coordinator command carried a term older than the one this member follows."""

    exit_code = 75  # EX_TEMPFAIL


class UnavailableError(CetdError):
    """A daemon or peer could not be reached."""

    exit_code = 69  # EX_UNAVAILABLE


class JobError(CetdError):
    """A training job was refused or failed; the message says why."""

    exit_code = 65  # EX_DATAERR
