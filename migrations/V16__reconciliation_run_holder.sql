-- Cluster mode: the process (`<node>/<instance>`) running a reconciliation run. A run whose
-- process is no longer a live node of the cluster is failed by the survivors (the lines it
-- applied stay applied; running the report again applies the rest). NULL outside cluster mode,
-- where a starting process fails every run still `running`.
ALTER TABLE reconciliation_runs ADD COLUMN holder text;
