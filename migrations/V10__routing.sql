-- Orchestration between PSPs (docs/API.md, "Connectors" and "Routing"; docs/DESIGN.md,
-- "Routing and failover").

-- A connector's credentials, sealed with AES-256-GCM under the `[secrets] key`: a 12-byte nonce
-- followed by the ciphertext and its tag, with the connector's id as associated data (a sealed
-- value copied to another row does not open). NULL: none (a sandbox connector).
ALTER TABLE connectors
    ADD COLUMN credentials bytea,
    -- The currencies it takes; empty: any.
    ADD COLUMN currencies  text[] NOT NULL DEFAULT '{}',
    -- Behaviour of a sandbox connector (latency_ms, failure_rate); nothing secret.
    ADD COLUMN settings    jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now();

-- A merchant's routing rules, as PUT /admin/v1/merchants/{id}/routing stored them.
CREATE TABLE routing_rules (
    merchant_id text PRIMARY KEY REFERENCES merchants (id),
    rules       jsonb NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every PSP attempt names the connector it went to. NULL: made before connectors were routed
-- (the merchant's own sandbox connector).
ALTER TABLE psp_attempts ADD COLUMN connector_id text;
-- The PSP's reference of an authorization that was failed over (a soft decline): its events
-- find the payment through it, and are recorded without changing it.
ALTER TABLE psp_attempts ADD COLUMN psp_reference text;
CREATE INDEX psp_attempts_reference ON psp_attempts (psp_reference) WHERE psp_reference IS NOT NULL;
-- `unreachable`: the call failed before the PSP received it (connection refused, a circuit
-- breaker open, an answer the PSP documents as "not processed"): nothing happened there.
ALTER TABLE psp_attempts DROP CONSTRAINT psp_attempts_outcome_check;
ALTER TABLE psp_attempts ADD CONSTRAINT psp_attempts_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'requires_action', 'pending', 'rejected', 'unreachable'));

-- Which connector a payment was routed to, by which rule, and its authorization attempts
-- (the payment object's `routing` and `attempts`). NULL: the merchant's own sandbox connector.
ALTER TABLE payments ADD COLUMN routing jsonb;

-- `processing`: the PSP took an authorization and decides it by event (Adyen's Pending,
-- Stripe's processing). `capturing`: an asynchronous PSP (Adyen) received a capture and
-- confirms or fails it later.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check CHECK (status IN ('pending', 'requires_action',
    'processing', 'authorized', 'in_review', 'capturing', 'captured', 'settled', 'refunding', 'chargeback_open',
    'failed', 'canceled', 'refunded'));
