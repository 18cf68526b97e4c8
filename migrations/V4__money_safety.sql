-- Money safety under faults (docs/RELIABILITY.md, "Findings and their fixes").

-- Idempotency keys are fenced. Every takeover of a key whose lease ran out bumps its fence;
-- a commit completes the key only while the key still holds the fence its request began
-- with, so a request that waited behind others cannot act for a key a retry took over.
ALTER TABLE idempotency_keys ADD COLUMN fence bigint NOT NULL DEFAULT 1 CHECK (fence >= 1);

-- A dispute never takes more than is left of the capture: refunds (pending or succeeded)
-- and the disputed amount together stay within the captured amount. NOT VALID: enforced
-- for every write from now on without failing the migration on rows written before it.
ALTER TABLE payments ADD CONSTRAINT payments_dispute_within_capture
    CHECK (amount_disputed + amount_refunded + refund_pending <= amount_captured) NOT VALID;

-- A dispute's PSP reference is unique per payment, not across every PSP and merchant.
ALTER TABLE disputes DROP CONSTRAINT disputes_psp_reference_key;
DROP INDEX disputes_payment;
ALTER TABLE disputes ADD CONSTRAINT disputes_payment_reference UNIQUE (payment_id, psp_reference);

-- A dead letter keeps the envelope it came in, so an operator can replay it, and when.
ALTER TABLE dead_letters ADD COLUMN envelope bytea;
ALTER TABLE dead_letters ADD COLUMN replayed_at timestamptz;
CREATE INDEX dead_letters_unreplayed ON dead_letters (id) WHERE replayed_at IS NULL;

-- Facts the PSP reported that the payment's state machine cannot take (a refund that
-- succeeded after a lost dispute, a clamped dispute, an event in another currency): kept
-- for an operator, never dropped.
CREATE TABLE payment_exceptions (
    id          bigserial PRIMARY KEY,
    payment_id  text NOT NULL REFERENCES payments (id),
    merchant_id text NOT NULL REFERENCES merchants (id),
    detail      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE INDEX payment_exceptions_open ON payment_exceptions (created_at) WHERE resolved_at IS NULL;
