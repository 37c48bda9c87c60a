"""IVOA VOSI documents (capabilities, availability) and the security method identifiers."""

from __future__ import annotations

VOSI_CAPS = "http://www.ivoa.net/xml/VOSICapabilities/v1.0"
VS = "http://www.ivoa.net/xml/VODataService/v1.1"
XSI = "http://www.w3.org/2001/XMLSchema-instance"


def _capabilities(base: str, caps: list[tuple[str, list[tuple[str, str, list[str]]]]]) -> str:
    """A VOSI capabilities document: (standardID, [(accessURL, use, [securityMethod])])."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<vosi:capabilities xmlns:vosi="{VOSI_CAPS}" xmlns:vs="{VS}" xmlns:xsi="{XSI}">',
    ]
    for std, interfaces in caps:
        parts.append(f'  <capability standardID="{std}">')
        for url, use, methods in interfaces:
            parts.append('    <interface xsi:type="vs:ParamHTTP" role="std">')
            parts.append(f'      <accessURL use="{use}">{url}</accessURL>')
            parts += [f'      <securityMethod standardID="{m}"/>' for m in methods]
            parts.append("    </interface>")
        parts.append("  </capability>")
    parts.append("</vosi:capabilities>")
    return "\n".join(parts) + "\n"


def _availability(note: str) -> str:
    # VOSI availability, as canfar/overview.py parses it.
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">\n'
        "  <vosi:available>true</vosi:available>\n"
        f"  <vosi:note>{note}</vosi:note>\n"
        "</vosi:availability>\n"
    )


TLS_CERT = "ivo://ivoa.net/sso#tls-with-certificate"
TOKEN = "ivo://ivoa.net/sso#token"
BASIC_AA = "ivo://ivoa.net/sso#BasicAA"
COOKIE = "ivo://ivoa.net/sso#cookie"
