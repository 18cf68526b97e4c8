-- payrail: outside a transaction
-- An entry is a line of its journal: its primary key becomes (journal_id, id), which serves the
-- look-ups by journal (`ledger verify`, the reports, the check that a journal has entries) that
-- `entries_journal` served, so that index goes. Nothing reads entries by `id` alone, so the old
-- primary key was an index no query used, and each entry (three per captured payment) paid an
-- insertion into it: three WAL records per payment fewer (`scripts/bench/writes.sh`,
-- docs/BENCHMARKS.md). `id` stays unique as its sequence hands it out.
--
-- entries is the largest table and every batch writes it, so the new key is built CONCURRENTLY:
-- writers go on while it is built. Each step below runs on its own, outside a transaction; the
-- last runs in the transaction that records this migration. A start that dies between steps
-- runs them all again: the first drops what an interrupted build left (an index marked invalid).
DROP INDEX CONCURRENTLY IF EXISTS entries_journal_id_key;
-- payrail: step
CREATE UNIQUE INDEX CONCURRENTLY entries_journal_id_key ON entries (journal_id, id);
-- payrail: step
-- The swap needs the table to itself, but only for a moment (no index is built under it):
-- batches queue behind it for at most a second, well inside their statement timeout, and the
-- runner tries again if it could not get the table in that second.
SET LOCAL lock_timeout = '1s';
ALTER TABLE entries DROP CONSTRAINT entries_pkey,
    ADD CONSTRAINT entries_pkey PRIMARY KEY USING INDEX entries_journal_id_key;
DROP INDEX entries_journal;
