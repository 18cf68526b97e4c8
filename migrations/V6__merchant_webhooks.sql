-- Merchant webhooks (docs/API.md, "Events" and "Webhook endpoints"). The outbox is the event
-- log: one row per committed change, its id the event's (`evt_` and the id in hex). A merchant
-- lists its own events, newest first.
CREATE INDEX outbox_merchant ON outbox (merchant_id, id);

CREATE TABLE webhook_endpoints (
    id                 text PRIMARY KEY CHECK (id LIKE 'we\_%'),
    merchant_id        text NOT NULL REFERENCES merchants (id),
    url                text NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    description        text,
    -- Event types, or '*' for all; never empty.
    enabled_events     text[] NOT NULL CHECK (cardinality(enabled_events) BETWEEN 1 AND 64),
    -- The signing secret: HMAC needs it in the clear, so it is shown once and never returned.
    secret             text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    -- After a rotation the old secret signs too, until it expires.
    previous_secret    text,
    previous_secret_expires_at timestamptz,
    -- The idempotency key (its digest) of the last rotation: a retried rotation rotates once.
    last_rotation_key  text,
    status             text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    disabled_reason    text,
    -- Since when every delivery has failed; NULL while the endpoint answers 2xx.
    failing_since      timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_merchant ON webhook_endpoints (merchant_id, created_at, id);

-- One row per (endpoint, event): at-least-once delivery's durable state. While `pending`,
-- `next_attempt_at` is the next try, or the end of the lease of a node trying it now.
CREATE TABLE webhook_deliveries (
    id                bigserial PRIMARY KEY,
    endpoint_id       text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id          bigint NOT NULL,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at   timestamptz,
    -- Retries stop here; a redelivery opens a new window.
    retry_until       timestamptz NOT NULL,
    last_attempt_at   timestamptz,
    last_status_code  smallint,
    last_latency_ms   integer,
    -- The first 1 KiB of the endpoint's answer, as text; never parsed.
    last_response     text CHECK (octet_length(last_response) <= 1024),
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    UNIQUE (endpoint_id, event_id),
    CHECK (status <> 'pending' OR next_attempt_at IS NOT NULL)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- A merchant's webhook_url becomes its first endpoint, for every event, disabled: its URL was
-- never checked as a target and its secret is new and unseen. The merchant rotates the secret
-- (POST /api/v1/webhook_endpoints/{id}/rotate_secret) and enables it ({"disabled": false}).
INSERT INTO webhook_endpoints (id, merchant_id, url, enabled_events, secret, status, disabled_reason)
SELECT 'we_' || substr(md5('webhook_url:' || id), 1, 24), id, webhook_url, ARRAY['*'],
       'whsec_' || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''),
       'disabled', 'made from the merchant''s webhook_url: rotate the secret, then enable it'
FROM merchants
WHERE webhook_url IS NOT NULL AND webhook_url <> '';
