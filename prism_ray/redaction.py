"""Credentials inside URIs never reach a record or a log line: user:password@ and signed query values go."""
from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# query parameters that carry credentials or signatures (AWS SigV2/V4, GCS, Azure SAS, generic tokens)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|AWSAccessKeyId|Signature|"
    r"X-Goog-Signature|X-Goog-Credential|sig|token|access_token|password|secret|key|api_key|apikey)=)"
    r"(?P<value>[^&#\s]+)", re.IGNORECASE)


def redact_uri(text: str) -> str:
    """`text` with every URI's user:password@ part and every credential-bearing query value replaced by ***."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}***", text)


def redact(obj: Any) -> Any:
    """A JSON-like value with every string passed through `redact_uri` (for records of configs)."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj
