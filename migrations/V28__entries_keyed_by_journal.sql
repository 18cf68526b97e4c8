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
-- (or gives up on the swap) runs them all again: a finished build is kept, and only what an
-- interrupted one left (an index marked invalid, or anything else under the new key's name) is
-- put aside and dropped.
DROP INDEX CONCURRENTLY IF EXISTS entries_journal_id_key_discarded;
-- payrail: step
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_index i
        WHERE i.indexrelid = to_regclass('entries_journal_id_key')
          AND NOT (i.indrelid = 'entries'::regclass AND i.indisvalid AND i.indisunique
                   AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnatts = 2
                   AND i.indkey[0] = (SELECT attnum FROM pg_attribute
                                      WHERE attrelid = 'entries'::regclass AND attname = 'journal_id')
                   AND i.indkey[1] = (SELECT attnum FROM pg_attribute
                                      WHERE attrelid = 'entries'::regclass AND attname = 'id'))
    ) THEN
        ALTER INDEX entries_journal_id_key RENAME TO entries_journal_id_key_discarded;
    END IF;
END
$$;
-- payrail: step
DROP INDEX CONCURRENTLY IF EXISTS entries_journal_id_key_discarded;
-- payrail: step
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS entries_journal_id_key ON entries (journal_id, id);
-- payrail: step
-- The swap needs the table to itself, but only for a moment (no index is built under it):
-- batches queue behind it for at most a second, well inside their statement timeout, and the
-- runner tries again if it could not get the table in that second.
SET LOCAL lock_timeout = '1s';
ALTER TABLE entries DROP CONSTRAINT entries_pkey,
    ADD CONSTRAINT entries_pkey PRIMARY KEY USING INDEX entries_journal_id_key;
DROP INDEX entries_journal;
