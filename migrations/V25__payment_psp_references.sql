-- A payment's PSP references move out of the payments table's indexes. The update that records
-- an authorization's outcome set `psp_reference`, an indexed column (`payments_psp_reference`),
-- so it could never be heap-only: it wrote a new entry into each of the table's five indexes
-- and, its new version landing on another page, a lock record for the old one. With no indexed
-- column changed by any update, every update of a payment can be HOT when its page has room
-- (V8 keeps a quarter of each page free for them).
--
-- The lookups by reference (PSP events, reconciliation, the merchant's search) read this table
-- instead. It keeps every reference a payment was ever given, and its primary key keeps what
-- the unique index kept: no two payments share a (PSP, reference), now not even one after the
-- other. `payments.psp_reference` stays the payment's current reference; the commit that sets it
-- records it here in the same transaction (src/adapters/postgres/commit.rs).
CREATE TABLE payment_psp_references (
    psp           text NOT NULL,
    psp_reference text NOT NULL,
    payment_id    text NOT NULL,
    PRIMARY KEY (psp, psp_reference)
);
INSERT INTO payment_psp_references (psp, psp_reference, payment_id)
    SELECT psp, psp_reference, id FROM payments WHERE psp_reference IS NOT NULL;
DROP INDEX payments_psp_reference;

-- The payment a reference names exists, checked once per statement as V23 checks the others.
CREATE FUNCTION payment_psp_references_payment() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.payment_id INTO missing FROM (SELECT DISTINCT payment_id FROM new_references) n
      LEFT JOIN LATERAL (SELECT true AS found FROM payments p WHERE p.id = n.payment_id LIMIT 1) x ON true
     WHERE x.found IS NULL
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'a PSP reference names an unknown payment %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
ALTER FUNCTION payment_psp_references_payment()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
CREATE TRIGGER payment_psp_references_payment AFTER INSERT ON payment_psp_references
    REFERENCING NEW TABLE AS new_references
    FOR EACH STATEMENT EXECUTE FUNCTION payment_psp_references_payment();

-- A reference once given stays with its payment: no update, delete or truncate.
CREATE TRIGGER payment_psp_references_fixed BEFORE UPDATE OR DELETE ON payment_psp_references
    FOR EACH ROW EXECUTE FUNCTION payrail_reject_mutation();
CREATE TRIGGER payment_psp_references_no_truncate BEFORE TRUNCATE ON payment_psp_references
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
