"""Ray's token authentication, as Loom's clients and embedded cluster use it.

Ray (2.60) reads its token from ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token`` (https://docs.ray.io/en/latest/ray-security/token-auth.html), but a client talking
to a remote head sends it only when ``RAY_AUTH_MODE=token`` is set. These helpers name where the token
comes from, never the token itself, so that the name can be printed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Where ``ray get-auth-token --generate`` writes the token, and where cluster.yaml mounts it on every node."""
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".ray" / "auth_token"


def token_source(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Where Ray would read the token from, in Ray's order, or None when there is none."""
    if environ.get(TOKEN_ENV, "").strip():
        return f"${TOKEN_ENV}"
    if environ.get(TOKEN_PATH_ENV):
        return f"{environ[TOKEN_PATH_ENV]} (${TOKEN_PATH_ENV})"
    default = default_token_path(environ)
    if default.is_file() and default.read_text().strip():
        return str(default)
    return None


def enable_client_token(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Make this process's Ray clients send the token when one exists; return where it comes from.

    An explicit ``RAY_AUTH_MODE`` is left as it is (``disabled`` is the user's decision); without one,
    a token found is a token sent, so ``loom submit`` reaches a token-protected head as ``ray.init`` does.
    """
    source = token_source(environ)
    if environ.get(AUTH_MODE):
        return source if environ[AUTH_MODE].lower() == "token" else None
    if source is not None:
        environ[AUTH_MODE] = "token"
    return source


def warn_if_embedded_unauthenticated(environ: MutableMapping[str, str] = os.environ) -> None:
    """Say so loudly when the embedded cluster is told to accept clients without Ray's token.

    With ``RAY_AUTH_MODE`` unset, Ray 2.60 turns token mode on for a local ``ray.init`` cluster and makes a
    token in ~/.ray/auth_token (``tests/ray/test_connect.py`` checks that a client without it is refused).
    Loom does not set the variable itself: Ray reads its auth mode into its C++ config when it is imported,
    and only its own default path refreshes that, so a variable set later leaves the driver without the
    token that its own cluster asks for.
    """
    mode = environ.get(AUTH_MODE)
    if mode is not None and mode.lower() != "token":
        log.warning(
            "%s=%s: the embedded Ray cluster accepts jobs from anyone who reaches its ports "
            "(Ray 2.60 listens on every interface); unset it to require Ray's token",
            AUTH_MODE,
            mode,
        )
