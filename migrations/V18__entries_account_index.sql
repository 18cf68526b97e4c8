-- No query reads entries by account: balances are kept in ledger_accounts (moved by every
-- batch), statements and reports find entries through their journal (entries_journal), and
-- `payrail ledger verify` reads the whole table. The index cost three insertions per payment
-- (one per entry) and a tenth of the WAL a payment writes to its indexes. A query that comes to
-- need it adds it back in its own migration, with the query that earns it.
DROP INDEX IF EXISTS entries_account;
