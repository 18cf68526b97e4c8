-- The references every payment's rows make, checked once per statement instead of by a
-- foreign-key trigger per row (docs/BENCHMARKS.md, "2026-11-28 (evening)"). A payment's batch
-- ran four such checks per payment: its merchant (from the payment and from its journal), its
-- payment (from its PSP attempt and its journal). Each was a trigger event queued per row and
-- a query of its own, and each locked the row it found (`FOR KEY SHARE`; the merchant's row is
-- locked so by every concurrent batch). V12 and V19 did the same for the audit trail and the
-- entries.
--
-- The checks hold because what they find stays: payments and merchants are never deleted by
-- payrail, a DELETE of one still named is refused (below, and `payments_keep_audit_trail`),
-- neither can be truncated, and the referencing columns cannot change.
ALTER TABLE payments DROP CONSTRAINT payments_merchant_id_fkey;
ALTER TABLE psp_attempts DROP CONSTRAINT psp_attempts_payment_id_fkey;
ALTER TABLE journals DROP CONSTRAINT journals_payment_id_fkey;
ALTER TABLE journals DROP CONSTRAINT journals_merchant_id_fkey;

-- Each check: one index probe per distinct key, planned so whatever the tables held when a
-- session first planned it (V13, V19).
CREATE FUNCTION payments_merchant() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.merchant_id INTO missing FROM (SELECT DISTINCT merchant_id FROM new_payments) n
      LEFT JOIN LATERAL (SELECT true AS found FROM merchants m WHERE m.id = n.merchant_id LIMIT 1) x ON true
     WHERE x.found IS NULL
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'a payment names an unknown merchant %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
ALTER FUNCTION payments_merchant()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
CREATE TRIGGER payments_merchant AFTER INSERT ON payments REFERENCING NEW TABLE AS new_payments
    FOR EACH STATEMENT EXECUTE FUNCTION payments_merchant();

CREATE FUNCTION psp_attempts_payment() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.payment_id INTO missing FROM (SELECT DISTINCT payment_id FROM new_attempts) n
      LEFT JOIN LATERAL (SELECT true AS found FROM payments p WHERE p.id = n.payment_id LIMIT 1) x ON true
     WHERE x.found IS NULL
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'a PSP attempt names an unknown payment %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
ALTER FUNCTION psp_attempts_payment()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
CREATE TRIGGER psp_attempts_payment AFTER INSERT ON psp_attempts REFERENCING NEW TABLE AS new_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION psp_attempts_payment();

-- A journal names its merchant, and its payment unless it is a settlement's.
CREATE FUNCTION journals_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT 'merchant ' || n.merchant_id INTO missing FROM (SELECT DISTINCT merchant_id FROM new_journals) n
      LEFT JOIN LATERAL (SELECT true AS found FROM merchants m WHERE m.id = n.merchant_id LIMIT 1) x ON true
     WHERE x.found IS NULL
     LIMIT 1;
    IF missing IS NULL THEN
        SELECT 'payment ' || n.payment_id INTO missing
          FROM (SELECT DISTINCT payment_id FROM new_journals WHERE payment_id IS NOT NULL) n
          LEFT JOIN LATERAL (SELECT true AS found FROM payments p WHERE p.id = n.payment_id LIMIT 1) x ON true
         WHERE x.found IS NULL
         LIMIT 1;
    END IF;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'a journal names an unknown %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
ALTER FUNCTION journals_references()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off;
CREATE TRIGGER journals_references AFTER INSERT ON journals REFERENCING NEW TABLE AS new_journals
    FOR EACH STATEMENT EXECUTE FUNCTION journals_references();

-- The referencing columns never change (journals refuse every UPDATE already). A trigger with a
-- column list fires only for an UPDATE that sets the column: payrail's never do, so they cost
-- nothing.
CREATE FUNCTION payrail_reference_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% never changes', TG_TABLE_NAME, TG_ARGV[0] USING ERRCODE = 'foreign_key_violation';
END $$;
CREATE TRIGGER payments_merchant_fixed BEFORE UPDATE OF merchant_id ON payments
    FOR EACH ROW WHEN (OLD.merchant_id IS DISTINCT FROM NEW.merchant_id)
    EXECUTE FUNCTION payrail_reference_fixed('merchant_id');
CREATE TRIGGER psp_attempts_payment_fixed BEFORE UPDATE OF payment_id ON psp_attempts
    FOR EACH ROW WHEN (OLD.payment_id IS DISTINCT FROM NEW.payment_id)
    EXECUTE FUNCTION payrail_reference_fixed('payment_id');

-- What is referenced stays. A payment with an audit trail already refuses DELETE (V12); one
-- with attempts or journals does too now. A merchant named by a payment or a journal refuses
-- DELETE. Neither table can be truncated.
CREATE OR REPLACE FUNCTION payments_keep_audit_trail() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM payment_transitions WHERE payment_id = OLD.id)
       OR EXISTS (SELECT 1 FROM journals WHERE payment_id = OLD.id)
       OR EXISTS (SELECT 1 FROM psp_attempts WHERE payment_id = OLD.id) THEN
        RAISE EXCEPTION 'payment % has an audit trail', OLD.id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;

CREATE FUNCTION merchants_keep_named() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM payments WHERE merchant_id = OLD.id)
       OR EXISTS (SELECT 1 FROM journals WHERE merchant_id = OLD.id) THEN
        RAISE EXCEPTION 'merchant % has payments or journals', OLD.id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER merchants_keep_named BEFORE DELETE ON merchants
    FOR EACH ROW EXECUTE FUNCTION merchants_keep_named();
CREATE TRIGGER merchants_no_truncate BEFORE TRUNCATE ON merchants
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
CREATE TRIGGER payments_no_truncate BEFORE TRUNCATE ON payments
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
