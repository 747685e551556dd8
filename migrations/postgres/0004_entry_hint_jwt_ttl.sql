-- Entries carry a hint for workloads that hold several identities (sent in the Workload API's
-- X509SVID.hint) and the longest lifetime of their JWT-SVIDs (0: the server's default). Both
-- can be changed later with `entry update`, which bumps the entry's revision like a create.

ALTER TABLE entries ADD COLUMN hint TEXT NOT NULL DEFAULT '';
ALTER TABLE entries ADD COLUMN jwt_ttl_secs BIGINT NOT NULL DEFAULT 0 CHECK (jwt_ttl_secs >= 0);
