-- Writes that every payment change pays for, made cheaper (docs/BENCHMARKS.md, "Reconciliation of
-- a large settlement report", and issue 16's per-payment costs).

-- The outbox's publishing state moves to a narrow table of its own. An event row is written once
-- and never updated: marking it published rewrote the whole row (its payload) and all three of its
-- indexes, and the relay's row lock wrote to it once more. A row of `outbox_pending` is the
-- event's id while it waits for JetStream's acknowledgement; the relay locks and deletes it. A
-- statement-level trigger notes every event an INSERT writes, whichever code path writes it, so
-- no event can be committed and never published.
-- Writers wait while the events still waiting move over (a node of the previous version may be
-- committing events meanwhile).
LOCK TABLE outbox IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE outbox_pending (id bigint PRIMARY KEY);
INSERT INTO outbox_pending SELECT id FROM outbox WHERE published_at IS NULL;

CREATE FUNCTION outbox_pending_note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_pending (id) SELECT id FROM new_events;
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_pending_note AFTER INSERT ON outbox REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_pending_note();

DROP INDEX outbox_unpublished;
ALTER TABLE outbox DROP COLUMN published_at;

-- A transition's payment, checked once per INSERT statement (a batch writes its transitions in
-- one) instead of by a foreign-key trigger per row that also locked the payment's row again.
-- Payments are never deleted while their audit trail names them.
ALTER TABLE payment_transitions DROP CONSTRAINT payment_transitions_payment_id_fkey;

CREATE FUNCTION payment_transitions_payment() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.payment_id INTO missing FROM new_transitions n
    WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = n.payment_id) LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'a transition names an unknown payment %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER payment_transitions_payment AFTER INSERT ON payment_transitions
    REFERENCING NEW TABLE AS new_transitions FOR EACH STATEMENT EXECUTE FUNCTION payment_transitions_payment();
CREATE TRIGGER payment_transitions_no_update BEFORE UPDATE ON payment_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();

CREATE FUNCTION payments_keep_audit_trail() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM payment_transitions WHERE payment_id = OLD.id) THEN
        RAISE EXCEPTION 'payment % has an audit trail', OLD.id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER payments_keep_audit_trail BEFORE DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION payments_keep_audit_trail();
