-- Cluster mode: which process claimed an idempotency key still in flight (`<node>/<instance>`,
-- as in partition_fences). A retry reaching another node may take over a key whose holder is no
-- longer a live node of the cluster at once, instead of waiting out the key's lease: the dead
-- node's request can no longer complete it (its commits are fenced by the key's fence and by
-- its partitions' leases). NULL outside cluster mode.
ALTER TABLE idempotency_keys ADD COLUMN holder text;
