-- PSP events: each applied at most once, kept as it came for audit; events no payment could
-- be found for after every delivery; and disputes (chargebacks).

-- Written in the same transaction as the change an event caused (or alone, for events that
-- change nothing): the dedupe that outlives JetStream's duplicate window.
CREATE TABLE processed_events (
    provider     text NOT NULL,
    event_id     text NOT NULL,
    event_type   text NOT NULL,
    payment_id   text,
    -- The PSP's body, byte for byte.
    raw          bytea NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

CREATE TABLE dead_letters (
    id         bigserial PRIMARY KEY,
    provider   text NOT NULL,
    event_id   text NOT NULL,
    event_type text NOT NULL,
    reference  text NOT NULL,
    reason     text NOT NULL,
    deliveries integer NOT NULL,
    raw        bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_created ON dead_letters (created_at DESC);

CREATE TABLE disputes (
    id            text PRIMARY KEY CHECK (id LIKE 'dp\_%'),
    payment_id    text NOT NULL REFERENCES payments (id),
    merchant_id   text NOT NULL REFERENCES merchants (id),
    psp_reference text NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    currency      char(3) NOT NULL,
    status        text NOT NULL CHECK (status IN ('needs_response', 'under_review', 'won', 'lost')),
    reason        text,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    UNIQUE (psp_reference)
);
CREATE INDEX disputes_merchant_created ON disputes (merchant_id, created_at DESC, id DESC);
CREATE INDEX disputes_payment ON disputes (payment_id);
