-- JWT-SVID signing keys (issue 11): each CA of the journal has an ES256 key beside it, with the
-- same lifecycle (published when the CA is prepared, signing while it is active, kept while
-- what it signed may live). The private key is a file in its server's data dir
-- (<data dir>/ca/<ca_id>.jwt.key, mode 0600), written before the public key lands here; the
-- public key is the uncompressed P-256 point, which every server publishes in the bundle.
-- NULL for a CA journaled before this migration: its server attaches a key at its next start.
ALTER TABLE ca_journal ADD COLUMN jwt_public BLOB;
