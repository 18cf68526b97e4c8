-- Since V24 no update of a payment changes an indexed column, so each can be heap-only (HOT)
-- when its new version fits on the row's page. With a quarter of each page kept free (V8), half
-- of the outcomes' updates found no room: a payment's row grows at its outcome (the card, the
-- risk decision, the routing), from about 500 to 800 bytes. With half of each page free, 96 % of
-- them are HOT (`scripts/bench/writes.sh`, docs/BENCHMARKS.md, "2026-11-28 (night)"), and the
-- table is no larger after a run: an update that is not HOT leaves its old version behind as
-- well, on a page of its own. Only pages written from now on are affected.
ALTER TABLE payments SET (fillfactor = 50);
