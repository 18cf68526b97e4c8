-- V20's check over the rows written before it: reads the whole outbox under a lock that lets
-- writers and the relay go on (SHARE UPDATE EXCLUSIVE), in its own transaction.
ALTER TABLE outbox VALIDATE CONSTRAINT outbox_one_payload;
