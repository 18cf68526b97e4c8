-- Fraud and risk controls: what a payment's customer and card are known by, the decision the
-- merchant's rules made, rules and lists, and the in_review status.

ALTER TABLE payments ADD COLUMN customer jsonb;
ALTER TABLE payments ADD COLUMN card jsonb;
ALTER TABLE payments ADD COLUMN risk jsonb;
-- Velocity counters are rebuilt on start from the last day's payments.
CREATE INDEX payments_created ON payments (created_at);

ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check CHECK (status IN ('pending', 'requires_action',
    'authorized', 'in_review', 'captured', 'settled', 'refunding', 'chargeback_open', 'failed', 'canceled', 'refunded'));

-- The sandbox tokenizer keeps what rules need of a card: never the number.
ALTER TABLE sandbox_payment_methods ADD COLUMN bin text;
ALTER TABLE sandbox_payment_methods ADD COLUMN fingerprint text;
ALTER TABLE sandbox_payment_methods ADD COLUMN country text;
ALTER TABLE sandbox_payment_methods ADD COLUMN funding text;

CREATE TABLE risk_rules (
    id          text PRIMARY KEY CHECK (id LIKE 'rr\_%'),
    merchant_id text NOT NULL REFERENCES merchants (id),
    action      text NOT NULL CHECK (action IN ('allow', 'block', 'review', 'request_3ds')),
    predicate   text NOT NULL CHECK (length(predicate) BETWEEN 1 AND 1000),
    description text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX risk_rules_merchant ON risk_rules (merchant_id, created_at, id);

CREATE TABLE risk_list_items (
    merchant_id text NOT NULL REFERENCES merchants (id),
    list        text NOT NULL CHECK (list ~ '^[A-Za-z0-9_]{1,64}$'),
    item        text NOT NULL CHECK (length(item) BETWEEN 1 AND 256),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, list, item)
);
