-- A payment's PSP references move out of the payments table's indexes. The update that records
-- an authorization's outcome set `psp_reference`, an indexed column (`payments_psp_reference`),
-- so it could never be heap-only: it wrote a new entry into each of the table's five indexes
-- and, its new version landing on another page, a lock record for the old one. With no indexed
-- column changed by any update, every update of a payment can be HOT when its page has room.
--
-- The look-ups by reference (PSP events, reconciliation, the merchant's search) read this table
-- instead. Its primary key keeps what the unique index kept: no two payments share a (PSP,
-- reference), now not even one after the other. `payments.psp_reference` stays the payment's
-- reference; a row trigger on `payments` records it here whenever a row is written with a new
-- one, so every writer is covered (payrail's batches, a node of the previous version still
-- running during an upgrade, an operator's SQL), in the same transaction.
-- The strongest lock first, before anything else here takes a weaker one: DROP INDEX below needs
-- it, and upgrading to it after the triggers' lock could deadlock with a batch holding a row
-- lock on a payment. Readers and writers of payments wait until this migration commits; those
-- that write then have their references recorded by the trigger.
LOCK TABLE payments IN ACCESS EXCLUSIVE MODE;

CREATE TABLE payment_psp_references (
    psp           text NOT NULL,
    psp_reference text NOT NULL,
    payment_id    text NOT NULL,
    PRIMARY KEY (psp, psp_reference)
);

-- Recorded before the row is written (a BEFORE trigger queues nothing for the statement's end);
-- the payment's row is the one being written, so the reference names it. A reference recorded
-- for this payment already is kept; one of another payment is refused, as the unique index
-- refused it (a plain insert after a probe: `ON CONFLICT` would cost a speculative insertion and
-- its confirmation record, and two writers of one reference at once are refused by the key).
CREATE FUNCTION payments_record_psp_reference() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    holder text;
BEGIN
    SELECT r.payment_id INTO holder FROM payment_psp_references r
     WHERE r.psp = NEW.psp AND r.psp_reference = NEW.psp_reference;
    IF NOT FOUND THEN
        INSERT INTO payment_psp_references (psp, psp_reference, payment_id)
        VALUES (NEW.psp, NEW.psp_reference, NEW.id);
    ELSIF holder <> NEW.id THEN
        RAISE EXCEPTION 'PSP reference % of % is another payment''s', NEW.psp_reference, NEW.psp
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END $$;
-- Index probes whatever the table held when a session first planned the check (V13, V23).
ALTER FUNCTION payments_record_psp_reference()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
CREATE TRIGGER payments_psp_reference_new BEFORE INSERT ON payments
    FOR EACH ROW WHEN (NEW.psp_reference IS NOT NULL)
    EXECUTE FUNCTION payments_record_psp_reference();
-- A column list and a condition: payrail's full updates name both columns, and the condition
-- calls the function only for the update that changes them (the outcome's), once per payment.
CREATE TRIGGER payments_psp_reference_set BEFORE UPDATE OF psp, psp_reference ON payments
    FOR EACH ROW WHEN (NEW.psp_reference IS NOT NULL
                       AND (OLD.psp_reference IS DISTINCT FROM NEW.psp_reference OR OLD.psp IS DISTINCT FROM NEW.psp))
    EXECUTE FUNCTION payments_record_psp_reference();

-- What the payments held before (the lock, taken first, lasts until this migration commits).
INSERT INTO payment_psp_references (psp, psp_reference, payment_id)
    SELECT psp, psp_reference, id FROM payments WHERE psp_reference IS NOT NULL;
DROP INDEX payments_psp_reference;

-- A reference once given stays with its payment: no update, delete or truncate.
CREATE TRIGGER payment_psp_references_fixed BEFORE UPDATE OR DELETE ON payment_psp_references
    FOR EACH ROW EXECUTE FUNCTION payrail_reject_mutation();
CREATE TRIGGER payment_psp_references_no_truncate BEFORE TRUNCATE ON payment_psp_references
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
