-- An outbox event is written as `json` (its text, checked and kept as written), not `jsonb`:
-- nothing queries inside an event, and every event was parsed into jsonb's binary form when
-- written (two per payment, the payment object each) and turned back into text when the relay
-- published it, then compacted by payrail (jsonb's text has spaces). `body` holds the events
-- written from now on; `payload` keeps the events written before, so no row is rewritten and the
-- table is locked only for the catalog changes. Readers take whichever is set.
ALTER TABLE outbox ADD COLUMN body json;
ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
-- Checked for new rows from now on; every row already there has a payload (it was NOT NULL) and
-- no body (the column is new). V21 validates the old rows in a transaction of its own, which
-- does not hold this one's exclusive lock while it reads the table.
ALTER TABLE outbox ADD CONSTRAINT outbox_one_payload CHECK ((payload IS NULL) <> (body IS NULL)) NOT VALID;
