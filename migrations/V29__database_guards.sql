-- payrail: outside a transaction
-- Guards the database keeps whoever writes to it: a repair script, a role with grants, a bug.
--
-- Each step below runs on its own, outside a transaction, and takes at most one table's lock:
-- batches write payments before journals, reconciliation and transfers journals before payments,
-- so a migration holding one of them while waiting for another could deadlock with either. Every
-- step but the last can run again (a start that dies between them runs them all again).

-- 1. Every trigger function of this schema reads this schema's tables, never a session's
-- temporary table of the same name. Unqualified names are looked up in `pg_temp` first unless the
-- path says otherwise, so a temporary `journals` or `entries` (made by anyone: every role may
-- make temporary tables) used to take the place of the real one inside the balance check, which
-- then passed an unbalanced journal. `ALTER FUNCTION … SET` keeps the planner settings V13 and
-- V19 gave them; a later `CREATE OR REPLACE` drops every setting, so it must set the path again
-- (the last step, and a test, check that none is left without). The schema's own: no
-- extension's, and none this role cannot change (the last step names any left).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
              WHERE p.pronamespace = current_schema()::regnamespace AND l.lanname = 'plpgsql'
                AND p.prokind = 'f' AND p.prorettype = 'trigger'::regtype
                AND pg_has_role(p.proowner, 'USAGE')
                AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                                  AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;
-- payrail: step
-- 2. The ids the statement-level reference checks (V12, V23) protect never change. Those checks
-- replaced foreign keys, which also refused an UPDATE of the referenced key: renamed, a payment
-- or a merchant would leave its journals, attempts and audit trail naming nothing (and could
-- then be deleted). AFTER triggers with a column list: payrail's updates never set `id`, so
-- they queue nothing and lock nothing (V26).
CREATE OR REPLACE TRIGGER payments_id_fixed AFTER UPDATE OF id ON payments
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION payrail_reference_fixed('id');
-- payrail: step
CREATE OR REPLACE TRIGGER merchants_id_fixed AFTER UPDATE OF id ON merchants
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION payrail_reference_fixed('id');
-- payrail: step
-- 3. A journal's entries are written by the transaction that writes the journal, and by no
-- later one. V19 checks at commit only that a journal has entries, "neither its entries nor
-- the journal can change afterwards": entries could still be added to a journal committed long
-- ago, in balanced pairs, posting its money a second time without unbalancing anything. Each
-- journal now records its transaction (no table rewrite: the column is added without a default,
-- which is set after), and the balance check refuses entries for a journal of another one.
ALTER TABLE journals ADD COLUMN IF NOT EXISTS tx xid8;
-- payrail: step
ALTER TABLE journals ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
-- payrail: step
CREATE OR REPLACE FUNCTION payrail_check_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
    unknown boolean;
    late boolean;
BEGIN
    SELECT n.journal_id, s.found = 0, s.late INTO bad, unknown, late
      FROM (SELECT DISTINCT journal_id FROM new_entries) n
     CROSS JOIN LATERAL (
           SELECT count(*) AS found, count(e.id) AS entries, sum(e.debit) AS debit,
                  sum(e.credit) AS credit, bool_or(e.currency <> j.currency) AS mixed,
                  bool_or(j.tx IS DISTINCT FROM pg_current_xact_id()) AS late
             FROM journals j LEFT JOIN entries e ON e.journal_id = j.id
            WHERE j.id = n.journal_id) s
     WHERE s.found = 0 OR s.late OR s.entries < 2 OR s.debit <> s.credit OR s.mixed
     ORDER BY s.found = 0 DESC  -- an unknown journal is named first (only failing ones are sorted)
     LIMIT 1;
    IF unknown THEN
        RAISE EXCEPTION 'an entry names an unknown journal %', bad USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF late THEN
        RAISE EXCEPTION 'journal % was written by an earlier transaction: its entries are final', bad
            USING ERRCODE = 'check_violation';
    END IF;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'journal % does not balance', bad USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
-- payrail: step
-- CREATE OR REPLACE reset its settings: V19's plans again, and the path of (1).
ALTER FUNCTION payrail_check_entries_balanced()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
-- payrail: step
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION payrail_check_entries_balanced() SET search_path = %I, pg_temp', current_schema());
END $$;
-- payrail: step
-- 4. A payment's audit trail (its transitions and PSP attempts) is kept: V12 refused UPDATE of
-- transitions, but DELETE and TRUNCATE of either emptied the trail, after which the payment
-- itself could be deleted (V23 refuses that only while a trail exists). Attempts are updated as
-- they finish; they are never deleted.
CREATE OR REPLACE TRIGGER payment_transitions_no_delete BEFORE DELETE ON payment_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
-- payrail: step
CREATE OR REPLACE TRIGGER payment_transitions_no_truncate BEFORE TRUNCATE ON payment_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
-- payrail: step
CREATE OR REPLACE TRIGGER psp_attempts_no_delete BEFORE DELETE ON psp_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
-- payrail: step
CREATE OR REPLACE TRIGGER psp_attempts_no_truncate BEFORE TRUNCATE ON psp_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
-- payrail: step
-- Last, in the transaction that records this migration: none of the schema's own trigger
-- functions is left without its path (one this role could not change is named, and the
-- migration stops for an operator rather than leave a check open).
DO $$
DECLARE
    left_open text;
BEGIN
    SELECT string_agg(p.oid::regprocedure::text, ', ') INTO left_open
      FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
     WHERE p.pronamespace = current_schema()::regnamespace AND l.lanname = 'plpgsql'
       AND p.prokind = 'f' AND p.prorettype = 'trigger'::regtype
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                         AND d.objid = p.oid AND d.deptype = 'e')
       AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\_path=%');
    IF left_open IS NOT NULL THEN
        RAISE EXCEPTION 'trigger functions without a fixed search_path (run this migration as their owner): %', left_open;
    END IF;
END $$;
