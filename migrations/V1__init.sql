-- payrail schema, version 1. Money is BIGINT minor units; every amount and status is CHECKed;
-- the ledger's invariants are enforced here as well as in code (DESIGN.md, "Invariants").

CREATE TABLE merchants (
    id               text PRIMARY KEY CHECK (id LIKE 'mer\_%'),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    default_currency char(3) NOT NULL,
    fee_bps          integer NOT NULL CHECK (fee_bps BETWEEN 0 AND 10000),
    fee_fixed        bigint NOT NULL CHECK (fee_fixed >= 0),
    webhook_url      text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- API keys are kept only as SHA-256 hashes: a key is 128 random bits, so a fast hash is
-- enough, and the lookup by hash never needs the plaintext.
CREATE TABLE api_keys (
    key_hash    bytea PRIMARY KEY CHECK (length(key_hash) = 32),
    merchant_id text NOT NULL REFERENCES merchants (id),
    -- "sk_test_" or "sk_live_" and the last four characters, to tell keys apart.
    hint        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_merchant ON api_keys (merchant_id);

CREATE TABLE payments (
    id                text PRIMARY KEY CHECK (id LIKE 'pay\_%'),
    merchant_id       text NOT NULL REFERENCES merchants (id),
    order_id          text NOT NULL CHECK (length(order_id) BETWEEN 1 AND 64),
    status            text NOT NULL CHECK (status IN ('pending', 'requires_action', 'authorized', 'captured',
                          'settled', 'refunding', 'chargeback_open', 'failed', 'canceled', 'refunded')),
    amount            bigint NOT NULL CHECK (amount BETWEEN 1 AND 99999999999),
    currency          char(3) NOT NULL,
    amount_capturable bigint NOT NULL DEFAULT 0,
    amount_captured   bigint NOT NULL DEFAULT 0,
    amount_refunded   bigint NOT NULL DEFAULT 0,
    refund_pending    bigint NOT NULL DEFAULT 0,
    amount_disputed   bigint NOT NULL DEFAULT 0,
    settled           boolean NOT NULL DEFAULT false,
    capture_strategy  text NOT NULL CHECK (capture_strategy IN ('automatic', 'manual')),
    payment_method    text NOT NULL CHECK (payment_method LIKE 'pm\_%'),
    psp               text NOT NULL,
    psp_reference     text,
    client_secret     text,
    next_action       jsonb,
    failure           jsonb,
    customer_id       text,
    description       text,
    metadata          jsonb NOT NULL DEFAULT '{}',
    fee_bps           integer NOT NULL CHECK (fee_bps BETWEEN 0 AND 10000),
    fee_fixed         bigint NOT NULL CHECK (fee_fixed >= 0),
    version           integer NOT NULL CHECK (version >= 0),
    transitions       integer NOT NULL CHECK (transitions >= 0),
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    -- Invariant 5: captured ≤ authorized; refunds (pending + succeeded) ≤ captured.
    CHECK (amount_capturable BETWEEN 0 AND amount),
    CHECK (amount_captured BETWEEN 0 AND amount),
    CHECK (amount_refunded >= 0 AND refund_pending >= 0 AND amount_refunded + refund_pending <= amount_captured),
    CHECK (amount_disputed BETWEEN 0 AND amount_captured)
);
CREATE UNIQUE INDEX payments_psp_reference ON payments (psp, psp_reference) WHERE psp_reference IS NOT NULL;
CREATE INDEX payments_merchant_created ON payments (merchant_id, created_at DESC, id DESC);
CREATE INDEX payments_merchant_order ON payments (merchant_id, order_id);

-- The audit trail: every status change, oldest first.
CREATE TABLE payment_transitions (
    payment_id  text NOT NULL REFERENCES payments (id),
    seq         integer NOT NULL CHECK (seq >= 0),
    from_status text,
    to_status   text NOT NULL,
    cause       text NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (payment_id, seq)
);

-- One row per PSP call, written before the call; `outcome` stays NULL until its answer is
-- committed. The id is the idempotency key the PSP receives.
CREATE TABLE psp_attempts (
    id          text PRIMARY KEY CHECK (id LIKE 'att\_%'),
    payment_id  text NOT NULL REFERENCES payments (id),
    operation   text NOT NULL CHECK (operation IN ('authorize', 'capture', 'cancel', 'refund')),
    amount      bigint CHECK (amount > 0),
    refund_id   text,
    -- The SHA-256 of the Idempotency-Key of the request that started it: a retry with that
    -- key is answered by this attempt's outcome once it is known.
    idempotency_key text,
    outcome     text CHECK (outcome IN ('succeeded', 'failed', 'requires_action', 'pending', 'rejected')),
    started_at  timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX psp_attempts_open ON psp_attempts (payment_id) WHERE outcome IS NULL;

CREATE TABLE refunds (
    id            text PRIMARY KEY CHECK (id LIKE 're\_%'),
    payment_id    text NOT NULL REFERENCES payments (id),
    merchant_id   text NOT NULL REFERENCES merchants (id),
    amount        bigint NOT NULL CHECK (amount > 0),
    currency      char(3) NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason        text,
    psp_reference text,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX refunds_payment ON refunds (payment_id, created_at);
CREATE INDEX refunds_pending ON refunds (merchant_id, currency) WHERE status = 'pending';

-- Idempotency records, scoped per merchant. `key` is the SHA-256 (hex) of the merchant's
-- Idempotency-Key: the key itself is never stored. `response_status` is NULL while the first request
-- runs; `locked_until` lets a retry take over a request that died. `resource_id` is written in
-- the same transaction as the object the request created, so a retry never creates a second.
CREATE TABLE idempotency_keys (
    merchant_id     text NOT NULL,
    key             text NOT NULL CHECK (length(key) = 64),
    fingerprint     bytea NOT NULL,
    resource_id     text,
    response_status smallint CHECK (response_status BETWEEN 200 AND 499),
    response_body   bytea,
    locked_until    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The double-entry ledger.
CREATE TABLE ledger_accounts (
    account      text NOT NULL,
    currency     char(3) NOT NULL,
    debit_total  bigint NOT NULL DEFAULT 0 CHECK (debit_total >= 0),
    credit_total bigint NOT NULL DEFAULT 0 CHECK (credit_total >= 0),
    PRIMARY KEY (account, currency)
);

CREATE TABLE journals (
    id             text PRIMARY KEY CHECK (id LIKE 'jr\_%'),
    payment_id     text NOT NULL REFERENCES payments (id),
    merchant_id    text NOT NULL REFERENCES merchants (id),
    kind           text NOT NULL CHECK (kind IN ('capture', 'refund', 'dispute_opened', 'dispute_won')),
    -- The attempt, refund or dispute that caused the journal (invariant 4).
    correlation_id text NOT NULL,
    currency       char(3) NOT NULL,
    created_at     timestamptz NOT NULL,
    UNIQUE (payment_id, kind, correlation_id)
);

CREATE TABLE entries (
    id         bigserial PRIMARY KEY,
    journal_id text NOT NULL REFERENCES journals (id),
    account    text NOT NULL,
    currency   char(3) NOT NULL,
    debit      bigint NOT NULL CHECK (debit >= 0),
    credit     bigint NOT NULL CHECK (credit >= 0),
    CHECK ((debit = 0) <> (credit = 0))
);
CREATE INDEX entries_journal ON entries (journal_id);
CREATE INDEX entries_account ON entries (account, currency);

-- Invariant 2: every journal balances per currency, checked when the transaction commits.
CREATE FUNCTION payrail_check_journal_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    -- One function for both tables: entries carry journal_id, journals their own id.
    jid text := coalesce(to_jsonb(NEW) ->> 'journal_id', to_jsonb(NEW) ->> 'id');
    d numeric;
    c numeric;
    n bigint;
    mixed boolean;
BEGIN
    SELECT coalesce(sum(e.debit), 0), coalesce(sum(e.credit), 0), count(*),
           bool_or(e.currency <> j.currency)
      INTO d, c, n, mixed
      FROM journals j LEFT JOIN entries e ON e.journal_id = j.id
     WHERE j.id = jid;
    IF n < 2 OR d <> c OR coalesce(mixed, false) THEN
        RAISE EXCEPTION 'journal % does not balance (debit %, credit %, % entries)', jid, d, c, n
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER journals_balanced AFTER INSERT ON journals
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION payrail_check_journal_balanced();
CREATE CONSTRAINT TRIGGER entries_balanced AFTER INSERT ON entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION payrail_check_journal_balanced();

-- Journals and entries are immutable: corrections are new journals.
CREATE FUNCTION payrail_reject_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER entries_immutable BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION payrail_reject_mutation();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();
CREATE TRIGGER journals_immutable BEFORE UPDATE OR DELETE ON journals
    FOR EACH ROW EXECUTE FUNCTION payrail_reject_mutation();
CREATE TRIGGER journals_no_truncate BEFORE TRUNCATE ON journals
    FOR EACH STATEMENT EXECUTE FUNCTION payrail_reject_mutation();

-- Events for merchants and downstream consumers, written in the transaction of the change.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    merchant_id  text NOT NULL,
    payment_id   text,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- The sandbox PSP's tokenized cards: brand, last four and expiry, never the number.
CREATE TABLE sandbox_payment_methods (
    id          text PRIMARY KEY CHECK (id LIKE 'pm\_%'),
    merchant_id text NOT NULL,
    brand       text NOT NULL,
    last4       char(4) NOT NULL,
    exp_month   smallint NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year    smallint NOT NULL,
    behaviour   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
