"""The JWT half of the Workload API through py-spiffe, as a Python workload uses it: fetches a
JWT-SVID for an audience, the JWT bundles, verifies the token locally against the bundle
(py-spiffe's own validator, on PyJWT), has the agent validate it (ValidateJWTSVID), checks that
the wrong audience is refused, follows the bundles with a JwtSource, and validates a task JWT
minted by `mayfly svid mint --jwt` (given on the command line) locally.

Usage: fetch_jwt.py EXPECTED_SPIFFE_ID EXPECTED_TRUST_DOMAIN TASK_TOKEN TASK_AUDIENCE
Prints one line per check; exits non-zero (with the reason on stderr) if one fails.
"""

import sys

import jwt

from spiffe import JwtSource, JwtSvid, TrustDomain, WorkloadApiClient


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def main() -> int:
    expected_id, expected_td, task_token, task_audience = sys.argv[1:5]
    td = TrustDomain(expected_td)
    with WorkloadApiClient(default_timeout=30) as client:
        svid = client.fetch_jwt_svid(audience={"billing-api"})
        if str(svid.spiffe_id) != expected_id:
            return fail(f"JWT-SVID names {svid.spiffe_id}, expected {expected_id}")
        print(f"jwt-svid {svid.spiffe_id}")

        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(td)
        if bundle is None or not bundle.jwt_authorities:
            return fail(f"no JWT bundle with keys for {expected_td}")
        print(f"jwt-bundle {bundle.trust_domain} {len(bundle.jwt_authorities)}")

        local = JwtSvid.parse_and_validate(svid.token, bundle, {"billing-api"})
        print(f"jwt-verified-locally {local.spiffe_id}")

        checked = client.validate_jwt_svid(svid.token, "billing-api")
        if str(checked.spiffe_id) != expected_id:
            return fail(f"the agent validated it as {checked.spiffe_id}")
        print(f"jwt-validated-by-agent {checked.spiffe_id}")

        try:
            client.validate_jwt_svid(svid.token, "another-api")
            return fail("the agent accepted the token for another audience")
        except Exception as err:  # py-spiffe raises ValidateJwtSvidError
            print(f"jwt-wrong-audience-refused {type(err).__name__}")

        task = JwtSvid.parse_and_validate(task_token, bundle, {task_audience})
        # Verified just above; read back only to show the scope claim.
        scope = jwt.decode(task_token, options={"verify_signature": False}).get("scope")
        print(f"task-jwt {task.spiffe_id} scope={scope}")

    with JwtSource(timeout_in_seconds=30) as source:
        if source.get_bundle_for_trust_domain(td) is None:
            return fail(f"JwtSource has no bundle for {expected_td}")
        print(f"jwt-source {expected_td}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
