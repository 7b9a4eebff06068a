-- The stand-in dispatch system's jobs table (make stack and the Debezium test create it): the columns
-- connectors/config/debezium.yaml maps for the jobs table, with the types a field-service database uses.
CREATE TABLE IF NOT EXISTS jobs (
    id                 text PRIMARY KEY,
    status             text NOT NULL,
    deal_id            text,
    scheduled_for      timestamptz,
    completed_at       timestamptz,
    account_ref        text,
    lines              text NOT NULL DEFAULT '[]',   -- JSON: [{sku, quantity, unit_price_cents, description}]
    customer_id        text,
    customer_name      text,
    concord_command_id text                          -- set by Concord's own dispatch adapter (echoes)
);
