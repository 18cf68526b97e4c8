-- The row checks on `payments` and `psp_attempts` run after the row is written, not before.
--
-- A table with any BEFORE UPDATE row trigger has each of its updated rows locked first, so the
-- trigger can be given the version it replaces: PostgreSQL calls the triggers after taking the
-- lock, whatever their column lists and conditions then decide. That lock is a WAL record of its
-- own and a second write of the row's header, for every update: the outcome's and the
-- capture's of a payment, the finish of its attempt (three per payment, `scripts/bench/writes.sh`
-- "Heap LOCK by relation"). An AFTER row trigger evaluates its condition as the row is written
-- and queues nothing when it is false; when it is true, its error still undoes the statement.
--
-- For the references it also means what is recorded is what was written: a BEFORE INSERT
-- trigger runs before `INSERT … ON CONFLICT` decides between inserting and updating, and would
-- record a reference for a row that was never inserted; an AFTER trigger runs only for the row
-- that was (its update's trigger, for the row that was updated instead).
--
-- This supersedes two comments of earlier migrations: V23's, that the column-list triggers on
-- `merchant_id` and `payment_id` cost nothing when no UPDATE sets the column (they cost the lock),
-- and V24's, that references are recorded before the row is written (now as it is written).
--
-- Both tables are locked first, in the order a batch writes them, before anything takes a weaker
-- lock (DROP TRIGGER needs this one).
LOCK TABLE payments, psp_attempts IN ACCESS EXCLUSIVE MODE;

DROP TRIGGER payments_merchant_fixed ON payments;
CREATE TRIGGER payments_merchant_fixed AFTER UPDATE OF merchant_id ON payments
    FOR EACH ROW WHEN (OLD.merchant_id IS DISTINCT FROM NEW.merchant_id)
    EXECUTE FUNCTION payrail_reference_fixed('merchant_id');

DROP TRIGGER psp_attempts_payment_fixed ON psp_attempts;
CREATE TRIGGER psp_attempts_payment_fixed AFTER UPDATE OF payment_id ON psp_attempts
    FOR EACH ROW WHEN (OLD.payment_id IS DISTINCT FROM NEW.payment_id)
    EXECUTE FUNCTION payrail_reference_fixed('payment_id');

DROP TRIGGER payments_psp_reference_new ON payments;
CREATE TRIGGER payments_psp_reference_new AFTER INSERT ON payments
    FOR EACH ROW WHEN (NEW.psp_reference IS NOT NULL)
    EXECUTE FUNCTION payments_record_psp_reference();

DROP TRIGGER payments_psp_reference_set ON payments;
CREATE TRIGGER payments_psp_reference_set AFTER UPDATE OF psp, psp_reference ON payments
    FOR EACH ROW WHEN (NEW.psp_reference IS NOT NULL
                       AND (OLD.psp_reference IS DISTINCT FROM NEW.psp_reference OR OLD.psp IS DISTINCT FROM NEW.psp))
    EXECUTE FUNCTION payments_record_psp_reference();
