-- `idempotency_keys_created` serves one reader, the purge of keys past their retention
-- (`created_at < now() - retention`, a few thousand at a time, in the background). As a B-tree it
-- took an entry for every key and for each of its updates that was not HOT: about 2.5 WAL records
-- a payment, the table's largest index cost after its primary key. Keys are written in time
-- order, so a BRIN index (a summary of each range of pages) finds the old ones as well, and a new
-- row or version costs it nothing until its range is summarized (by autovacuum, as ranges fill).
DROP INDEX idempotency_keys_created;
CREATE INDEX idempotency_keys_created ON idempotency_keys USING brin (created_at) WITH (pages_per_range = 32, autosummarize = on);
