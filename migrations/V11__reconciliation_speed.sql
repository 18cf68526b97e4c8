-- Reconciliation at report scale (docs/BENCHMARKS.md, "Reconciliation of a large settlement
-- report"): the database itself refuses what a chunk's commit used to look up first.

-- One matched line per capture, refund and dispute (per connector), whichever chunk or run matched
-- it first: unique partial indexes, so that a second one fails the INSERT that writes it. Lines
-- that did not match keep their own partial indexes (the "missing in report" scan asks whether any
-- line named a capture or refund).
DROP INDEX settlement_lines_payment;
DROP INDEX settlement_lines_refund;
DROP INDEX settlement_lines_dispute;
CREATE UNIQUE INDEX settlement_lines_matched_charge ON settlement_lines (payment_id, connector_id)
    WHERE kind = 'charge' AND outcome = 'matched';
CREATE INDEX settlement_lines_unmatched_charge ON settlement_lines (payment_id)
    WHERE kind = 'charge' AND outcome = 'exception' AND payment_id IS NOT NULL;
CREATE UNIQUE INDEX settlement_lines_matched_refund ON settlement_lines (refund_id, connector_id)
    WHERE refund_id IS NOT NULL AND outcome = 'matched';
CREATE INDEX settlement_lines_unmatched_refund ON settlement_lines (refund_id)
    WHERE refund_id IS NOT NULL AND outcome = 'exception';
CREATE UNIQUE INDEX settlement_lines_matched_dispute ON settlement_lines (reference, kind, connector_id)
    WHERE kind IN ('dispute', 'dispute_reversal') AND outcome = 'matched';

-- The lines' references to their connector and run, checked once per INSERT statement over the
-- distinct values it wrote (a chunk writes thousands of lines of one connector and one run), not
-- by a foreign-key trigger per line (measured: two per-line checks were two thirds of the
-- INSERT's time). Lines are never updated; connectors and runs are never deleted while lines
-- name them.
ALTER TABLE settlement_lines DROP CONSTRAINT settlement_lines_connector_id_fkey;
ALTER TABLE settlement_lines DROP CONSTRAINT settlement_lines_run_id_fkey;

CREATE FUNCTION settlement_lines_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT coalesce(
               (SELECT 'connector ' || n.connector_id FROM (SELECT DISTINCT connector_id FROM new_lines) n
                WHERE NOT EXISTS (SELECT 1 FROM connectors c WHERE c.id = n.connector_id) LIMIT 1),
               (SELECT 'run ' || n.run_id FROM (SELECT DISTINCT run_id FROM new_lines) n
                WHERE NOT EXISTS (SELECT 1 FROM reconciliation_runs r WHERE r.id = n.run_id) LIMIT 1))
      INTO missing;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'settlement line names an unknown %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER settlement_lines_references AFTER INSERT ON settlement_lines REFERENCING NEW TABLE AS new_lines
    FOR EACH STATEMENT EXECUTE FUNCTION settlement_lines_references();

CREATE FUNCTION settlement_lines_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'settlement lines are never changed' USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER settlement_lines_immutable BEFORE UPDATE OF connector_id, run_id ON settlement_lines
    FOR EACH STATEMENT EXECUTE FUNCTION settlement_lines_immutable();

CREATE FUNCTION settlement_lines_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_TABLE_NAME = 'connectors' AND EXISTS (SELECT 1 FROM settlement_lines WHERE connector_id = OLD.id))
       OR (TG_TABLE_NAME = 'reconciliation_runs' AND EXISTS (SELECT 1 FROM settlement_lines WHERE run_id = OLD.id)) THEN
        RAISE EXCEPTION '% % has settlement lines', TG_TABLE_NAME, OLD.id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER connectors_settlement_lines BEFORE DELETE ON connectors
    FOR EACH ROW EXECUTE FUNCTION settlement_lines_referenced();
CREATE TRIGGER reconciliation_runs_settlement_lines BEFORE DELETE ON reconciliation_runs
    FOR EACH ROW EXECUTE FUNCTION settlement_lines_referenced();
