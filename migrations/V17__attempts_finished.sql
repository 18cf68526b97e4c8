-- An attempt is finished when, and only when, its outcome is known: both are written by the one
-- statement that finishes it. The batch's finishing update looks for unfinished attempts by
-- `finished_at`, so that its plan is one primary-key probe per attempt; asked by `outcome`, a
-- plan made while the table was small scanned the whole `psp_attempts_open` index (every attempt
-- in flight) for each batch (docs/DESIGN.md, "Plans that stay cheap").
-- NOT VALID: checked for every row written from now on, without scanning the table under an
-- exclusive lock at deploy. The rows written before satisfy it by construction (every version of
-- that statement wrote both); `ALTER TABLE psp_attempts VALIDATE CONSTRAINT psp_attempts_finished`
-- proves it whenever convenient, under a lock that lets writes go on.
ALTER TABLE psp_attempts ADD CONSTRAINT psp_attempts_finished
    CHECK ((outcome IS NULL) = (finished_at IS NULL)) NOT VALID;
