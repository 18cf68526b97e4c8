-- DESIGN.md's PostgreSQL ceiling: one payment row, its journal and two entries per
-- transaction, in one WITH … INSERT statement. Run by pgbench with 32 clients.
\set amount random(1, 100000)
\set m random(1, 1000)
BEGIN;
WITH p AS (
    INSERT INTO payments (merchant, amount, currency, status, idem_key)
    VALUES ('m' || :m, :amount, 'USD', 'captured', md5(random()::text || clock_timestamp()::text))
    RETURNING id
), j AS (
    INSERT INTO journals (payment_id) SELECT id FROM p RETURNING id
)
INSERT INTO entries (journal_id, account, debit, credit)
SELECT id, 'customer_in_transit', :amount, 0 FROM j
UNION ALL
SELECT id, 'merchant_payable:m' || :m, 0, :amount FROM j;
COMMIT;
