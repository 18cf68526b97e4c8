-- An entry is a line of its journal: its primary key becomes (journal_id, id), which serves the
-- look-ups by journal (`ledger verify`, the reports, the check that a journal has entries) that
-- `entries_journal` served, so that index goes. Nothing reads entries by `id` alone, so the old primary key was an index no
-- query used, and each entry (three per captured payment) paid an insertion into it: three WAL
-- records per payment fewer (`scripts/bench/writes.sh`, docs/BENCHMARKS.md, "2026-11-28 (late)").
-- `id` stays, unique as its sequence hands it out.
--
-- The table is locked while the new index is built (under the migration's hour-long timeout);
-- writers of entries wait for it.
LOCK TABLE entries IN ACCESS EXCLUSIVE MODE;
ALTER TABLE entries DROP CONSTRAINT entries_pkey, ADD CONSTRAINT entries_pkey PRIMARY KEY (journal_id, id);
DROP INDEX entries_journal;
