-- An outbox event is written as `json` (its text, checked and kept as written), not `jsonb`:
-- nothing queries inside an event, and every event was parsed into jsonb's binary form when
-- written (two per payment, the payment object each) and turned back into text when the relay
-- published it, then compacted by payrail (jsonb's text has spaces). `body` holds the events
-- written from now on; `payload` keeps the events written before, so no row is rewritten and the
-- table is not locked for longer than the catalog changes take. Readers take whichever is set.
ALTER TABLE outbox ADD COLUMN body json;
ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE outbox ADD CONSTRAINT outbox_one_payload CHECK ((payload IS NULL) <> (body IS NULL)) NOT VALID;
-- Reads the table without blocking its writers.
ALTER TABLE outbox VALIDATE CONSTRAINT outbox_one_payload;
