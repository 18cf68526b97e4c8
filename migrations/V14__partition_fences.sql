-- Cluster mode (docs/DESIGN.md, "Growing past one machine"): which node holds each partition's
-- lease, and under which lease revision. A node writes its row when it takes a partition's
-- lease in NATS KV, before it serves the partition; every commit of a payment actor in cluster
-- mode reads its partition's row FOR SHARE and fails unless the row still names this node's
-- holder and revision. A node that lost its lease (paused, cut off) can therefore no longer
-- write, and a takeover waits for commits already under way to finish before it loads state.
CREATE TABLE partition_fences (
    partition int PRIMARY KEY CHECK (partition >= 0),
    -- The KV revision at which the holder created the lease.
    revision bigint NOT NULL CHECK (revision > 0),
    -- The node id and this process's instance: a restarted node with the same id is another holder.
    holder text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now()
);
