-- Roles, grants and the reader's settings profile of the Stratoscope database.
-- Generated: stratoscope schema grants (do not edit; docs/CLICKHOUSE.md).
CREATE ROLE IF NOT EXISTS stratoscope_writer ON CLUSTER '{cluster}';
CREATE ROLE IF NOT EXISTS stratoscope_migrator ON CLUSTER '{cluster}';
CREATE ROLE IF NOT EXISTS stratoscope_reader ON CLUSTER '{cluster}';
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.profile_stacks TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.series TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.metric_points TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.histogram_points TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.profile_samples TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.events TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.nodes TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.profile_stacks_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.series_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.metric_points_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.histogram_points_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.profile_samples_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.events_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' INSERT ON stratoscope.nodes_local TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' SELECT ON stratoscope.schema_migrations TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' SELECT ON stratoscope.schema_migration_steps TO stratoscope_writer;
GRANT ON CLUSTER '{cluster}' CREATE DATABASE, CREATE TABLE, CREATE VIEW, DROP TABLE, DROP VIEW, ALTER TABLE, ALTER VIEW, INSERT, SELECT ON stratoscope.* TO stratoscope_migrator;
GRANT ON CLUSTER '{cluster}' stratoscope_writer TO stratoscope_migrator;
GRANT ON CLUSTER '{cluster}' CLUSTER ON *.* TO stratoscope_migrator;
GRANT ON CLUSTER '{cluster}' SELECT ON stratoscope.* TO stratoscope_reader;
CREATE SETTINGS PROFILE OR REPLACE stratoscope_reader ON CLUSTER '{cluster}' SETTINGS readonly = 1, max_execution_time = 60 MAX 60 CHANGEABLE_IN_READONLY, join_use_nulls = 0 CHANGEABLE_IN_READONLY TO stratoscope_reader;
