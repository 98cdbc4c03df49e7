-- A read-only role for the people and tools that only read eventsync's database:
-- `eventsync status|events|sql`, psql, Grafana, Datasette...
--
-- docker-compose.yml runs this file once, when Postgres creates its data volume, as the role
-- that owns the database (eventsync) and that later creates the tables by migrating. On an
-- existing database, run it as that same role:
--   psql -v ON_ERROR_STOP=1 -U eventsync -d eventsync -f docs/postgres-reader.sql
-- To log in over the network, give the role a password too:
--   ALTER ROLE eventsync_reader PASSWORD '...';

CREATE ROLE eventsync_reader LOGIN;
-- Every transaction it starts is read-only, whatever it asks for.
ALTER ROLE eventsync_reader SET default_transaction_read_only = on;

GRANT CONNECT ON DATABASE :"DBNAME" TO eventsync_reader;
GRANT USAGE ON SCHEMA public TO eventsync_reader;
-- The tables and views there now...
GRANT SELECT ON ALL TABLES IN SCHEMA public TO eventsync_reader;
-- ...and those the role running this creates later (eventsync's migrations).
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO eventsync_reader;
