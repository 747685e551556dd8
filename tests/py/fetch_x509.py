"""Fetches an X.509-SVID and the X.509 bundles from the Workload API with py-spiffe's
WorkloadApiClient (one-shot calls), then through its X509Source (the long-lived
FetchX509SVID stream most applications use), exactly as a Python workload would: the socket
comes from SPIFFE_ENDPOINT_SOCKET and the gRPC channel is py-spiffe's own (no channel options).

Usage: fetch_x509.py EXPECTED_SPIFFE_ID EXPECTED_TRUST_DOMAIN
Prints one line per check; exits non-zero (with the reason on stderr) if one fails.
"""

import sys

from spiffe import TrustDomain, WorkloadApiClient, X509Source


def main() -> int:
    expected_id, expected_td = sys.argv[1], sys.argv[2]
    # A deadline, so a refused or hanging call fails the test instead of blocking it.
    with WorkloadApiClient(default_timeout=30) as client:
        svid = client.fetch_x509_svid()
        if str(svid.spiffe_id) != expected_id:
            print(f"SVID names {svid.spiffe_id}, expected {expected_id}", file=sys.stderr)
            return 1
        if not svid.cert_chain or svid.private_key is None:
            print("the SVID has no certificate chain or no key", file=sys.stderr)
            return 1
        print(f"x509-svid {svid.spiffe_id}")

        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain(expected_td))
        if bundle is None or not bundle.x509_authorities:
            names = sorted(str(b.trust_domain) for b in bundles.bundles)
            print(f"no X.509 bundle for {expected_td} (got {names})", file=sys.stderr)
            return 1
        print(f"x509-bundle {bundle.trust_domain} {len(bundle.x509_authorities)}")

    with X509Source(timeout_in_seconds=30) as source:
        if str(source.svid.spiffe_id) != expected_id:
            print(f"X509Source holds {source.svid.spiffe_id}", file=sys.stderr)
            return 1
        if source.get_bundle_for_trust_domain(TrustDomain(expected_td)) is None:
            print(f"X509Source has no bundle for {expected_td}", file=sys.stderr)
            return 1
        print(f"x509-source {source.svid.spiffe_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
