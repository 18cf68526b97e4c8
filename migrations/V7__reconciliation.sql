-- Settlement and reconciliation; merchant reporting and receipts (docs/API.md,
-- "Reconciliation", "Reports", "Receipts").

-- A merchant's account at a PSP. Every merchant has its sandbox connector; its id is derived
-- from the merchant's, so the demo merchant's is known in advance.
CREATE TABLE connectors (
    id          text PRIMARY KEY CHECK (id LIKE 'mca\_%'),
    merchant_id text NOT NULL REFERENCES merchants (id),
    psp         text NOT NULL CHECK (psp IN ('sandbox', 'stripe', 'adyen')),
    label       text NOT NULL CHECK (length(label) BETWEEN 1 AND 100),
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX connectors_merchant ON connectors (merchant_id);
INSERT INTO connectors (id, merchant_id, psp, label)
    SELECT 'mca_' || left(encode(sha256(convert_to(id, 'UTF8')), 'hex'), 24), id, 'sandbox', 'sandbox' FROM merchants;

-- The sandbox PSP's own books: what it captured, refunded and lost to disputes, by day. Its
-- settlement reports are made from here, never from payrail's tables.
CREATE TABLE sandbox_settlement_book (
    id          bigserial PRIMARY KEY,
    merchant_id text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('charge', 'refund', 'dispute', 'dispute_reversal')),
    -- The object's own reference (pi_…, re_…, du_…) and the intent it belongs to.
    reference   text NOT NULL,
    intent      text NOT NULL,
    -- Signed, as the PSP's balance moves: a refund or a dispute is negative.
    amount      bigint NOT NULL CHECK (amount <> 0),
    currency    char(3) NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, reference)
);
CREATE INDEX sandbox_settlement_book_day ON sandbox_settlement_book (merchant_id, at);

-- One reconciliation of one report against one connector.
CREATE TABLE reconciliation_runs (
    id            text PRIMARY KEY CHECK (id LIKE 'rcn\_%'),
    connector_id  text NOT NULL REFERENCES connectors (id),
    format        text NOT NULL CHECK (format IN ('stripe', 'adyen')),
    source        text NOT NULL CHECK (source IN ('upload', 'sandbox', 'schedule')),
    report_date   date,
    file_sha256   text,
    status        text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    lines         integer NOT NULL DEFAULT 0,
    -- Lines an earlier run already applied: a report given twice changes nothing.
    already_applied integer NOT NULL DEFAULT 0,
    matched       integer NOT NULL DEFAULT 0,
    exceptions    integer NOT NULL DEFAULT 0,
    error         text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX reconciliation_runs_connector ON reconciliation_runs (connector_id, started_at DESC);

-- Every report line applied, once: its natural key is the PSP's own (Stripe's txn id, or
-- Adyen's batch, reference, type and modification). A line given again is skipped.
CREATE TABLE settlement_lines (
    connector_id text NOT NULL REFERENCES connectors (id),
    line_key     text NOT NULL,
    run_id       text NOT NULL REFERENCES reconciliation_runs (id),
    line_no      integer NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('charge', 'refund', 'dispute', 'dispute_reversal', 'payout', 'other')),
    reference    text NOT NULL,
    intent       text,
    amount       bigint NOT NULL,
    fee          bigint NOT NULL,
    currency     char(3) NOT NULL,
    created      timestamptz NOT NULL,
    payment_id   text,
    refund_id    text,
    outcome      text NOT NULL CHECK (outcome IN ('matched', 'exception')),
    -- The journal that carried its fee (or, for a payout, the payout itself).
    journal_id   text,
    PRIMARY KEY (connector_id, line_key)
);
CREATE INDEX settlement_lines_payment ON settlement_lines (payment_id, kind) WHERE payment_id IS NOT NULL;
CREATE INDEX settlement_lines_refund ON settlement_lines (refund_id) WHERE refund_id IS NOT NULL;
CREATE INDEX settlement_lines_dispute ON settlement_lines (reference, kind) WHERE kind IN ('dispute', 'dispute_reversal');

CREATE TABLE reconciliation_exceptions (
    id           text PRIMARY KEY CHECK (id LIKE 'rex\_%'),
    connector_id text NOT NULL REFERENCES connectors (id),
    run_id       text NOT NULL REFERENCES reconciliation_runs (id),
    type         text NOT NULL CHECK (type IN ('amount_mismatch', 'missing_in_payrail', 'missing_in_report',
                     'duplicate_in_report', 'currency_mismatch', 'status_mismatch', 'malformed_line',
                     'unsupported_line')),
    -- What makes it one exception: a report line, or payrail's capture or refund.
    dedupe_key   text NOT NULL,
    line_no      integer,
    line_key     text,
    reference    text,
    payment_id   text,
    refund_id    text,
    expected     bigint,
    reported     bigint,
    currency     char(3),
    detail       text NOT NULL,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolved_by  text,
    resolution   text,
    resolved_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (connector_id, type, dedupe_key)
);
CREATE INDEX reconciliation_exceptions_open ON reconciliation_exceptions (created_at DESC, id DESC) WHERE status = 'open';
CREATE INDEX reconciliation_exceptions_run ON reconciliation_exceptions (run_id);
-- A matched line resolves the open exceptions with its reference.
CREATE INDEX reconciliation_exceptions_open_reference ON reconciliation_exceptions (connector_id, reference)
    WHERE status = 'open';
-- Report lines name refunds and disputes by the PSP's reference.
CREATE INDEX refunds_psp_reference ON refunds (psp_reference) WHERE psp_reference IS NOT NULL;
CREATE INDEX disputes_psp_reference ON disputes (psp_reference);

-- Journals a report posts: the PSP's fees (Dr psp_fees_expense / Cr psp_clearing) and its
-- payouts to the bank (Dr bank / Cr psp_clearing). A payout has no payment.
ALTER TABLE journals ALTER COLUMN payment_id DROP NOT NULL;
ALTER TABLE journals DROP CONSTRAINT journals_kind_check;
-- NOT VALID, then VALIDATE: the check of the rows already there takes no lock that stops writes.
ALTER TABLE journals ADD CONSTRAINT journals_kind_check
    CHECK (kind IN ('capture', 'refund', 'dispute_opened', 'dispute_won', 'psp_fee', 'psp_payout')) NOT VALID;
ALTER TABLE journals VALIDATE CONSTRAINT journals_kind_check;
ALTER TABLE journals ADD CONSTRAINT journals_payment_unless_settlement
    CHECK (payment_id IS NOT NULL OR kind IN ('psp_fee', 'psp_payout')) NOT VALID;
ALTER TABLE journals VALIDATE CONSTRAINT journals_payment_unless_settlement;
-- Settlement journals are keyed by what posted them (a chunk of a run, a payout line).
CREATE UNIQUE INDEX journals_settlement_key ON journals (kind, correlation_id) WHERE payment_id IS NULL;
-- A merchant's ledger movements by time: balance transactions, and captures to reconcile.
CREATE INDEX journals_merchant_created ON journals (merchant_id, created_at, id);

-- Customer receipts: an unguessable token per payment, made when the merchant first asks.
CREATE TABLE receipts (
    token      text PRIMARY KEY CHECK (token LIKE 'rcpt\_%'),
    payment_id text NOT NULL UNIQUE REFERENCES payments (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
