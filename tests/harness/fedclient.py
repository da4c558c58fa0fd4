"""Federation requests to a Synapse under test, signed as one of the fake's servers.

The fake resident's servers have deterministic keys (fakehs/keys.py), which the
Synapse under test fetches through the fake (its notary), so a test can ask the
Synapse's federation API anything as any of them: `/state_ids`,
`/get_missing_events`, ...
"""

import json
import urllib.parse
from typing import Any

import treq
from canonicaljson import encode_canonical_json
from signedjson.sign import sign_json
from twisted.internet import ssl
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.harness.fakehs.keys import KEY_ID, signing_key


@implementer(IPolicyForHTTPS)
class _NoVerifyTLS:
    def creatorForNetloc(self, hostname: bytes, port: int) -> ssl.CertificateOptions:  # noqa: N802
        return ssl.CertificateOptions(verify=False)


def authorization(
    origin: str, destination: str, method: str, uri: str, content: Any = None
) -> str:
    """The X-Matrix Authorization header of a request from `origin`."""
    request: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    signed = sign_json(request, origin, signing_key(origin))
    sig = signed["signatures"][origin][KEY_ID]
    return f'X-Matrix origin="{origin}",destination="{destination}",key="{KEY_ID}",sig="{sig}"'


async def federation_request(
    base_url: str,
    destination: str,
    origin: str,
    method: str,
    path: str,
    params: Any = None,
    content: Any = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """Send one signed federation request to `base_url` (the Synapse's
    federation listener, whose server name is `destination`) as `origin`.
    Returns (status, decoded JSON body)."""
    from twisted.internet import reactor

    uri = path
    if params:
        uri += "?" + urllib.parse.urlencode(params)
    headers = {"Authorization": authorization(origin, destination, method, uri, content)}
    data = None
    if content is not None:
        data = encode_canonical_json(content)
        headers["Content-Type"] = "application/json"
    client = treq.client.HTTPClient(Agent(reactor, contextFactory=_NoVerifyTLS()))
    response = await client.request(method, base_url + uri, headers=headers, data=data, timeout=timeout)
    body = await response.content()
    try:
        return response.code, json.loads(body)
    except ValueError:
        return response.code, body.decode("utf-8", "replace")
