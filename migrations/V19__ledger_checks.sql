-- Invariant 2 (every journal balances) and the entries' reference to their journal, enforced by
-- the database at the same moments as before, for less work per payment (docs/BENCHMARKS.md,
-- "2026-11-28 (afternoon)").

-- An entry's journal must exist: checked by the statement-level balance check, which probes the
-- journal of every entry a statement writes anyway, instead of a per-row foreign-key trigger
-- (three per payment: a query each, and a lock on the journal's row, written to the WAL). A
-- journal, once there, stays: journals refuse DELETE and TRUNCATE (journals_immutable,
-- journals_no_truncate), so the reference cannot break later.
ALTER TABLE entries DROP CONSTRAINT entries_journal_id_fkey;

CREATE OR REPLACE FUNCTION payrail_check_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
    unknown boolean;
BEGIN
    SELECT n.journal_id, s.found = 0 INTO bad, unknown
      FROM (SELECT DISTINCT journal_id FROM new_entries) n
     CROSS JOIN LATERAL (
           SELECT count(*) AS found, count(e.id) AS entries, sum(e.debit) AS debit,
                  sum(e.credit) AS credit, bool_or(e.currency <> j.currency) AS mixed
             FROM journals j LEFT JOIN entries e ON e.journal_id = j.id
            WHERE j.id = n.journal_id) s
     WHERE s.found = 0 OR s.entries < 2 OR s.debit <> s.credit OR s.mixed
     LIMIT 1;
    IF unknown THEN
        RAISE EXCEPTION 'an entry names an unknown journal %', bad USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'journal % does not balance', bad USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
-- CREATE OR REPLACE resets a function's settings: V13's index-probe-only plans, again, and no
-- bitmap scans (for two or three entries an index scan is cheaper, and a bitmap scan may read
-- a whole index).
ALTER FUNCTION payrail_check_entries_balanced()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;

-- At commit, a journal with no entries is refused: one index probe per journal. Whether a
-- journal with entries balances was checked when each statement writing its entries ended
-- (above), and neither its entries nor the journal can change afterwards. The check used to
-- recompute the balance over all of the journal's entries, and to find the journal's id by
-- turning the row into JSONB twice (one function served both tables then).
CREATE OR REPLACE FUNCTION payrail_check_journal_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM entries WHERE journal_id = NEW.id) THEN
        RAISE EXCEPTION 'journal % does not balance (no entries)', NEW.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
-- Planned as an index probe whatever the table held when the session planned it (V13).
ALTER FUNCTION payrail_check_journal_balanced() SET enable_seqscan = off SET enable_bitmapscan = off;

-- A transition's payment, probed per row. The NOT EXISTS form left the planner free to read
-- every payment once per batch (a bitmap scan of a whole index, materialized, then filtered):
-- planned by a session while the table held a few dozen analyzed rows, that plan stayed with the
-- session as the table grew (seen under load with auto_explain: 2.5 ms per batch instead of
-- 0.3 ms, a third of PostgreSQL's time in some runs). A lateral subquery with a limit is one
-- index probe per transition, however small the table looks.
CREATE OR REPLACE FUNCTION payment_transitions_payment() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.payment_id INTO missing FROM new_transitions n
      LEFT JOIN LATERAL (SELECT true AS found FROM payments p WHERE p.id = n.payment_id LIMIT 1) x ON true
     WHERE x.found IS NULL
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'a transition names an unknown payment %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
ALTER FUNCTION payment_transitions_payment()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;

-- A seller's pending funds, its account probed per entry for the same reason: the join left the
-- planner free to walk the whole connected_accounts index for each seller's entry (seen in the
-- plan a session keeps once it planned on a new database). The account is the primary key, so a
-- limit of one changes nothing else.
CREATE OR REPLACE FUNCTION seller_pending_funds_note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seller_pending_funds (entry_id, account, currency, amount, available_on)
    SELECT n.id, a.id, n.currency, n.credit, now() + make_interval(days => a.payout_delay_days)
    FROM new_entries n
    CROSS JOIN LATERAL (SELECT c.id, c.payout_delay_days FROM connected_accounts c
                         WHERE c.id = substr(n.account, 16) LIMIT 1) a
    WHERE n.credit > 0 AND n.account LIKE 'seller\_pending:%';
    RETURN NULL;
END $$;
ALTER FUNCTION seller_pending_funds_note()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
