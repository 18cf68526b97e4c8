-- The outbox relay follows a cursor over the events' transactions instead of a queue of pending
-- rows (docs/DESIGN.md, "OutboxRelay"). V12's `outbox_pending` cost every event a row inserted by
-- a trigger, locked by the relay and deleted once published, with its index entry: 6 of the 71
-- WAL records a payment wrote, and three statements per relay round.
--
-- Each event now carries the id of the transaction that wrote it (`tx`, the top-level
-- transaction's, also from a subtransaction). The relay publishes, in (tx, id) order, the events
-- after its cursor written by transactions older than every transaction still running
-- (`pg_snapshot_xmin`): those have all ended, and any event written later, by a running
-- transaction or one not yet begun, has a higher `tx`, so it can never fall behind the cursor.
-- One row, `outbox_cursor`, holds how far it has published; a relay round locks it, so one node
-- relays at a time.
ALTER TABLE outbox ADD COLUMN tx xid8;
-- The events still waiting move to the cursor's side (published at least once: a relay of the
-- previous version holding some of them publishes them too, and JetStream drops the repeat by
-- `Nats-Msg-Id`). Events written before, all published, keep no transaction.
UPDATE outbox o SET tx = '1' FROM outbox_pending p WHERE p.id = o.id;
ALTER TABLE outbox ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
DROP TRIGGER outbox_pending_note ON outbox;
DROP FUNCTION outbox_pending_note();
DROP TABLE outbox_pending;

-- Partial: the events written before this migration never enter it. Built under this
-- transaction's exclusive lock on `outbox` (one read of the table, while readers and writers
-- wait; a single-mode node applies migrations before it serves).
CREATE INDEX outbox_relay ON outbox (tx, id) WHERE tx IS NOT NULL;

CREATE TABLE outbox_cursor (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    tx  xid8 NOT NULL,
    id  bigint NOT NULL
);
INSERT INTO outbox_cursor (tx, id) VALUES ('0', 0);

-- Events committed and not yet published, for operators and drills.
CREATE VIEW outbox_waiting AS
    SELECT o.id, o.merchant_id, o.payment_id, o.event_type, o.created_at, o.tx
    FROM outbox o, outbox_cursor c WHERE o.tx IS NOT NULL AND (o.tx, o.id) > (c.tx, c.id);
