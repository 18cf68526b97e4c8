-- Balances per ledger shard ("slot"): each shard moves only its own rows, so the hot accounts
-- (psp_clearing, platform_fee_revenue) no longer serialize the shards. An account's balance
-- is the sum of its slots; `payrail ledger verify` checks it against the entries.
ALTER TABLE ledger_accounts ADD COLUMN slot smallint NOT NULL DEFAULT 0 CHECK (slot >= 0);
ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_pkey;
ALTER TABLE ledger_accounts ADD PRIMARY KEY (account, currency, slot);
