"""Verifies a JWT-SVID as a relying party outside SPIFFE does: from the issuer's OIDC
discovery document to its jwks_uri, with PyJWT's PyJWKClient choosing the key by the token's
kid, then jwt.decode checking the ES256 signature, the expiry and the audience.

Usage: verify_oidc.py ISSUER CA_FILE AUDIENCE  (the token on stdin)
Prints "verified sub=<sub> kid=<kid>" and exits 0, or prints "refused: <PyJWT error class>:
<message>" on stderr and exits 1. Any other failure (the discovery document unreadable or
naming another issuer) exits 2, so a test cannot take it for a refusal.
"""

import json
import ssl
import sys
import urllib.request

import jwt


def main() -> int:
    issuer, ca_file, audience = sys.argv[1], sys.argv[2], sys.argv[3]
    token = sys.stdin.read().strip()
    # Trust only the given CA (the trust domain's bundle or the operator's CA), never the
    # system store, so the test proves which certificate was served.
    context = ssl.create_default_context(cafile=ca_file)

    url = issuer + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        config = json.load(response)
    if config.get("issuer") != issuer:
        print(f"the discovery document names issuer {config.get('issuer')!r}, not {issuer!r}",
              file=sys.stderr)
        return 2

    client = jwt.PyJWKClient(config["jwks_uri"], ssl_context=context, timeout=10)
    try:
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=config["id_token_signing_alg_values_supported"],
            audience=audience,
            # The server names its discovery issuer in `iss`, as cloud IAM federation needs.
            issuer=issuer,
            options={"require": ["exp", "sub", "aud", "iss"]},
        )
    except jwt.exceptions.PyJWTError as e:
        print(f"refused: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"verified sub={claims['sub']} kid={key.key_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
