-- The restore matrix's source database: one of each kind of object a restore must bring back.
-- Extensions are added by tests/test_restore.py from what both servers offer; the role
-- fixture_reader is created on every cluster first (roles are not part of a database dump).

CREATE SCHEMA sales;
CREATE SCHEMA "Lager ü";

CREATE TYPE sales.status AS ENUM ('new', 'paid', 'shipped');
CREATE DOMAIN sales.positive AS numeric(10, 2) CHECK (VALUE > 0);
CREATE SEQUENCE sales.invoice_no START 1000 INCREMENT 7;

CREATE TABLE sales.customers (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text,
    created timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00'
);
CREATE TABLE sales.orders (
    id bigserial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES sales.customers ON DELETE CASCADE,
    status sales.status NOT NULL DEFAULT 'new',
    total sales.positive,
    invoice int NOT NULL DEFAULT nextval('sales.invoice_no') CHECK (invoice > 0),
    doc jsonb
);
CREATE INDEX orders_open_idx ON sales.orders (status) WHERE status <> 'shipped';
CREATE INDEX orders_doc_idx ON sales.orders USING gin (doc);
COMMENT ON TABLE sales.orders IS 'Bestellungen – orders';

CREATE TABLE "Lager ü"."Artikel ü" (k text PRIMARY KEY, v bytea, tags int[]);
CREATE TABLE public.plain (id int PRIMARY KEY, note text);

CREATE FUNCTION sales.default_doc() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.doc := coalesce(NEW.doc, '{}');
  RETURN NEW;
END
$$;
CREATE TRIGGER orders_default_doc BEFORE INSERT ON sales.orders
    FOR EACH ROW EXECUTE FUNCTION sales.default_doc();

INSERT INTO sales.customers (email, name)
    SELECT 'c' || g || '@exämple.org', 'Zoë ' || g FROM generate_series(1, 300) g;
INSERT INTO sales.orders (customer_id, status, total, doc)
    SELECT 1 + g % 300, (ARRAY['new', 'paid', 'shipped'])[1 + g % 3]::sales.status, g % 500 + 0.5,
           CASE WHEN g % 2 = 0 THEN jsonb_build_object('n', g, 'note', 'Grüße ' || g) END
    FROM generate_series(1, 3000) g;
INSERT INTO "Lager ü"."Artikel ü"
    SELECT 'k' || g, decode(md5(g::text), 'hex'), ARRAY[g, g * 2] FROM generate_series(1, 200) g;
INSERT INTO public.plain SELECT g, repeat('x', g % 50) FROM generate_series(1, 100) g;
SELECT setval('sales.invoice_no', 90001);

CREATE VIEW sales.big_orders AS
    SELECT o.id, c.email, o.total FROM sales.orders o JOIN sales.customers c ON c.id = o.customer_id
    WHERE o.total > 100;
CREATE MATERIALIZED VIEW sales.totals AS
    SELECT customer_id, count(*) AS n, sum(total) AS total FROM sales.orders GROUP BY customer_id;
CREATE UNIQUE INDEX totals_customer_idx ON sales.totals (customer_id);

SELECT lo_from_bytea(424242, convert_to(repeat('large object ü ', 1000), 'UTF8'));
SELECT lo_from_bytea(424243, '\x00ff00ff'::bytea);

GRANT USAGE ON SCHEMA sales TO fixture_reader;
GRANT SELECT ON sales.customers, sales.big_orders, sales.totals TO fixture_reader;
GRANT SELECT (id, status) ON sales.orders TO fixture_reader;
GRANT USAGE ON SEQUENCE sales.invoice_no TO fixture_reader;
GRANT SELECT ON LARGE OBJECT 424242 TO fixture_reader;
REVOKE ALL ON FUNCTION sales.default_doc() FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA sales GRANT SELECT ON TABLES TO fixture_reader;
