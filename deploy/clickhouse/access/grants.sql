-- Roles, grants and the reader's settings profile of the Stratoscope database.
-- Generated: stratoscope schema grants (do not edit; docs/CLICKHOUSE.md).
CREATE ROLE IF NOT EXISTS stratoscope_writer;
CREATE ROLE IF NOT EXISTS stratoscope_migrator;
CREATE ROLE IF NOT EXISTS stratoscope_reader;
GRANT INSERT ON stratoscope.profile_stacks TO stratoscope_writer;
GRANT INSERT ON stratoscope.series TO stratoscope_writer;
GRANT INSERT ON stratoscope.metric_points TO stratoscope_writer;
GRANT INSERT ON stratoscope.histogram_points TO stratoscope_writer;
GRANT INSERT ON stratoscope.profile_samples TO stratoscope_writer;
GRANT INSERT ON stratoscope.events TO stratoscope_writer;
GRANT INSERT ON stratoscope.nodes TO stratoscope_writer;
GRANT SELECT ON stratoscope.schema_migrations TO stratoscope_writer;
GRANT SELECT ON stratoscope.schema_migration_steps TO stratoscope_writer;
GRANT CREATE DATABASE, CREATE TABLE, CREATE VIEW, DROP TABLE, DROP VIEW, ALTER TABLE, ALTER VIEW, INSERT, SELECT ON stratoscope.* TO stratoscope_migrator;
GRANT stratoscope_writer TO stratoscope_migrator;
GRANT SELECT ON stratoscope.* TO stratoscope_reader;
CREATE SETTINGS PROFILE OR REPLACE stratoscope_reader SETTINGS readonly = 1, max_execution_time = 60 MAX 60 CHANGEABLE_IN_READONLY, join_use_nulls = 0 CHANGEABLE_IN_READONLY TO stratoscope_reader;
