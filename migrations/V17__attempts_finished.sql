-- An attempt is finished when, and only when, its outcome is known: both are written by the one
-- statement that finishes it. The batch's finishing update looks for unfinished attempts by
-- `finished_at`, so that its plan is one primary-key probe per attempt; asked by `outcome`, a
-- plan made while the table was small scanned the whole `psp_attempts_open` index (every attempt
-- in flight) for each batch (docs/DESIGN.md, "Plans that stay cheap").
ALTER TABLE psp_attempts ADD CONSTRAINT psp_attempts_finished CHECK ((outcome IS NULL) = (finished_at IS NULL));
