-- A real program: sqlite3 in WAL mode fills a table and builds an index
-- over it, sorting through temporary files it deletes as it opens them
-- (O_NOFOLLOW). The runner dumps it while it builds the index, restores it,
-- and compares the last line with an uninterrupted run.
.shell touch "$ZDTM_READY"
PRAGMA journal_mode=WAL;
PRAGMA cache_size=-2000;
PRAGMA temp_store=FILE;
CREATE TABLE t(a INTEGER, b TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 1200000)
INSERT INTO t SELECT (x * 7919) % 1000003, printf('%08x', (x * 2654435761) % 4294967296) FROM c;
.print indexing
CREATE INDEX ta ON t(a, b);
.print indexed
PRAGMA integrity_check;
SELECT count(*), sum(a), (SELECT group_concat(b) FROM (SELECT b FROM t INDEXED BY ta ORDER BY a, b LIMIT 5 OFFSET 777777)) FROM t;
