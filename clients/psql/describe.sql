-- psql's meta-commands against Millrace's pg_catalog (run by server/tests/clients.rs).
CREATE TABLE people (id BIGINT PRIMARY KEY, name TEXT NOT NULL, born DATE);
CREATE SCHEMA crm;
CREATE TABLE crm.leads (id INT, score DOUBLE PRECISION);
INSERT INTO people VALUES (1, 'Ada', '1815-12-10');
\dt
\d people
\dn
\l
SELECT name FROM people;
