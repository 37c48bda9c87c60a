"""The CANFAR stand-ins' route tables: each request the services answer reaches its handler.

Pure lookups: no sandbox, no network, no root.
"""

from __future__ import annotations

import pytest

from sandbox.canfar import cred, skaha
from sandbox.canfar.web import match, route


def _lookup(routes: list, method: str, path: str) -> tuple[str, dict[str, str]] | None:
    found = match(routes, method, path)
    return None if found is None else (found[0].handler.__name__, found[1])


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
@pytest.mark.parametrize(
    ("path", "handler"),
    [("/skaha/availability", "_availability_doc"), ("/skaha/capabilities", "_capabilities_doc")],
)
def test_skaha_vosi_documents_answer_any_method(method: str, path: str, handler: str) -> None:
    assert _lookup(skaha.VOSI_ROUTES, method, path) == (handler, {})


@pytest.mark.parametrize(
    ("method", "rest", "expected"),
    [
        ("GET", "image", ("_images", {})),
        ("GET", "context", ("_context", {})),
        ("GET", "session", ("_list_sessions", {})),
        ("POST", "session", ("_create", {})),
        ("GET", "session/abc12345", ("_get_session", {"sid": "abc12345"})),
        ("POST", "session/abc12345", ("_session_action", {"sid": "abc12345"})),
        ("DELETE", "session/abc12345", ("_delete_session", {"sid": "abc12345"})),
        ("PUT", "session/abc12345", ("_session_other", {"sid": "abc12345"})),
        ("POST", "image", None),
        ("PUT", "session", None),
        ("DELETE", "session", None),
        ("GET", "images", None),
        ("GET", "session/abc12345/logs", None),
        ("GET", "session//abc12345", None),
        ("GET", "", None),
    ],
)
def test_skaha_api_rows(method: str, rest: str, expected: tuple | None) -> None:
    assert _lookup(skaha.API_ROUTES, method, rest) == expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/reg/resource-caps", "_resource_caps"),
        ("POST", "/reg/resource-caps", "_resource_caps"),
        ("GET", "/cred/availability", "_availability_doc"),
        ("DELETE", "/cred/capabilities", "_capabilities_doc"),
        ("GET", cred.CDP_PATH, "_password_certificate"),
        ("GET", cred.CDP_CERT_PATH, "_renewed_certificate"),
        ("POST", cred.CDP_PATH, None),
        ("PUT", cred.CDP_CERT_PATH, None),
        ("GET", "/cred/privx", None),
        ("GET", "/cred/priv/cert/x", None),
    ],
)
def test_cred_rows(method: str, path: str, expected: str | None) -> None:
    found = _lookup(cred.ROUTES, method, path)
    assert (found and found[0]) == expected


def test_a_row_is_its_path_with_named_segments() -> None:
    row = route("GET", "a.b/{x}/c/{y}", print)
    assert row.pattern.fullmatch("a.b/1/c/two").groupdict() == {"x": "1", "y": "two"}
    assert row.pattern.fullmatch("aXb/1/c/two") is None  # the rest of the path is literal
    assert row.pattern.fullmatch("a.b/1/2/c/two") is None  # a segment holds no "/"
