"""Reading what the pipeline stored: the cookbook of named queries, where they run (a
regional's read endpoint or a ClickHouse server), how results print, and profiles out
as folded stacks, pprof and SVG flame graphs."""
