-- Marketplaces (docs/API.md, "Marketplaces"): a platform merchant's
-- sellers, and the splits of its payments. A seller's money lives in the ledger, in
-- seller_pending:{acct} and seller_available:{acct}; this table holds who the seller is.
CREATE TABLE connected_accounts (
    id                 text PRIMARY KEY CHECK (id LIKE 'acct\_%'),
    platform_id        text NOT NULL REFERENCES merchants (id),
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    email              text CHECK (length(email) <= 254),
    country            char(2) NOT NULL,
    default_currency   char(3) NOT NULL,
    status             text NOT NULL CHECK (status IN ('active', 'restricted', 'disabled')),
    payout_interval    text NOT NULL CHECK (payout_interval IN ('manual', 'daily', 'weekly')),
    payout_delay_days  integer NOT NULL CHECK (payout_delay_days BETWEEN 0 AND 30),
    payout_minimum     bigint NOT NULL CHECK (payout_minimum >= 0),
    -- Where payouts go: a bank account token of the payout rail (the sandbox's: ba_success,
    -- ba_delayed, ba_failure).
    bank_account       text NOT NULL CHECK (length(bank_account) BETWEEN 1 AND 64),
    metadata           jsonb NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);
CREATE INDEX connected_accounts_platform ON connected_accounts (platform_id, created_at DESC, id DESC);

-- A split payment's splits, application fee, and what each part got and gave back (NULL for a
-- payment without splits).
ALTER TABLE payments ADD COLUMN splits jsonb;

-- How a refund of a split payment is shared: the sellers give back their parts
-- (reverse_splits), and the platform its application fee (refund_application_fee).
ALTER TABLE refunds ADD COLUMN reverse_splits boolean NOT NULL DEFAULT true;
ALTER TABLE refunds ADD COLUMN refund_application_fee boolean NOT NULL DEFAULT false;

-- Transfers from a platform's balance to one of its sellers (separate charges and transfers),
-- and their reversals. The reversed total can never pass the amount: the database checks it.
CREATE TABLE transfers (
    id              text PRIMARY KEY CHECK (id LIKE 'tr\_%'),
    platform_id     text NOT NULL REFERENCES merchants (id),
    destination     text NOT NULL REFERENCES connected_accounts (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        char(3) NOT NULL,
    amount_reversed bigint NOT NULL DEFAULT 0 CHECK (amount_reversed BETWEEN 0 AND amount),
    source_payment  text REFERENCES payments (id),
    transfer_group  text CHECK (length(transfer_group) <= 64),
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL
);
CREATE INDEX transfers_platform ON transfers (platform_id, created_at DESC, id DESC);

CREATE TABLE transfer_reversals (
    id          text PRIMARY KEY CHECK (id LIKE 'trr\_%'),
    transfer_id text NOT NULL REFERENCES transfers (id),
    amount      bigint NOT NULL CHECK (amount > 0),
    created_at  timestamptz NOT NULL
);
CREATE INDEX transfer_reversals_transfer ON transfer_reversals (transfer_id, created_at);

-- A seller's captured funds wait in seller_pending:{acct} until their available_on (the
-- capture's time plus the account's payout delay), then a release journal moves them to
-- seller_available:{acct}. Each credit of a seller_pending account is noted here by the
-- database itself as its entry is written, whichever code path wrote it.
-- No foreign keys on the hot path: the trigger takes entry_id from the entry it notes and account
-- from connected_accounts itself, so both exist by construction.
CREATE TABLE seller_pending_funds (
    entry_id         bigint PRIMARY KEY,
    account          text NOT NULL,
    currency         char(3) NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    available_on     timestamptz NOT NULL,
    released_journal text REFERENCES journals (id)
);
CREATE INDEX seller_pending_funds_due ON seller_pending_funds (available_on) WHERE released_journal IS NULL;

-- Once per INSERT statement, over the rows it wrote (a ledger batch writes all its entries in one).
CREATE FUNCTION seller_pending_funds_note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seller_pending_funds (entry_id, account, currency, amount, available_on)
    SELECT n.id, a.id, n.currency, n.credit, now() + make_interval(days => a.payout_delay_days)
    FROM new_entries n JOIN connected_accounts a ON a.id = substr(n.account, 16)
    WHERE n.credit > 0 AND n.account LIKE 'seller\_pending:%';
    RETURN NULL;
END $$;
CREATE TRIGGER entries_seller_pending AFTER INSERT ON entries REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION seller_pending_funds_note();

-- The marketplace's journals (transfers and their reversals, releases of sellers' funds, payouts)
-- belong to no payment; each is keyed by what posted it (journals_settlement_key: one journal
-- per kind and correlation when payment_id is NULL).
ALTER TABLE journals DROP CONSTRAINT journals_kind_check;
ALTER TABLE journals ADD CONSTRAINT journals_kind_check
    CHECK (kind IN ('capture', 'refund', 'dispute_opened', 'dispute_won', 'psp_fee', 'psp_payout',
                    'transfer', 'transfer_reversal', 'funds_available', 'payout', 'payout_paid',
                    'payout_returned')) NOT VALID;
ALTER TABLE journals VALIDATE CONSTRAINT journals_kind_check;
ALTER TABLE journals DROP CONSTRAINT journals_payment_unless_settlement;
ALTER TABLE journals ADD CONSTRAINT journals_payment_unless_settlement
    CHECK (payment_id IS NOT NULL OR kind IN ('psp_fee', 'psp_payout', 'transfer', 'transfer_reversal',
                                              'funds_available', 'payout', 'payout_paid', 'payout_returned')) NOT VALID;
ALTER TABLE journals VALIDATE CONSTRAINT journals_payment_unless_settlement;

-- Payouts: a seller's available funds (or, with no account, the platform's own balance) sent to
-- a bank account through the payout rail. pending → in_transit → paid | failed, or canceled
-- while pending. The rail reports the outcome by signed webhook.
CREATE TABLE payouts (
    id           text PRIMARY KEY CHECK (id LIKE 'po\_%'),
    platform_id  text NOT NULL REFERENCES merchants (id),
    account      text REFERENCES connected_accounts (id),
    amount       bigint NOT NULL CHECK (amount > 0),
    currency     char(3) NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'in_transit', 'paid', 'failed', 'canceled')),
    bank_account text NOT NULL CHECK (length(bank_account) BETWEEN 1 AND 64),
    automatic    boolean NOT NULL,
    failure_code text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX payouts_platform ON payouts (platform_id, created_at DESC, id DESC);
CREATE INDEX payouts_open ON payouts (updated_at) WHERE status IN ('pending', 'in_transit');
-- A seller's scheduled payouts by day: one a day per currency.
CREATE INDEX payouts_automatic ON payouts (account, currency, created_at) WHERE automatic;

-- Invariant 2 (every journal balances), checked once per INSERT statement of entries instead of
-- once per entry: a split payment's journal has eight entries, and each per-row check re-read
-- them all. The journals a statement's entries belong to must balance when the statement ends
-- (every writer inserts a journal's entries in one statement); the deferred per-journal trigger
-- (journals_balanced) still refuses, at commit, a journal with no entries.
DROP TRIGGER entries_balanced ON entries;
CREATE FUNCTION payrail_check_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
BEGIN
    SELECT j.id INTO bad
      FROM journals j
      JOIN (SELECT DISTINCT journal_id FROM new_entries) n ON n.journal_id = j.id
      LEFT JOIN entries e ON e.journal_id = j.id
     GROUP BY j.id
    HAVING count(e.id) < 2 OR sum(e.debit) <> sum(e.credit) OR bool_or(e.currency <> j.currency)
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'journal % does not balance', bad USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER entries_balanced AFTER INSERT ON entries REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_check_entries_balanced();
