-- Alert state (survives restarts), the firing/resolved events, and each rule's health.

CREATE TABLE alert_state (
    alert          text        NOT NULL,
    key            text        NOT NULL,   -- the key labels, canonical "name=value,…"
    group_name     text        NOT NULL,
    labels         jsonb       NOT NULL,
    phase          text        NOT NULL CHECK (phase IN ('inactive', 'pending', 'firing', 'resolved')),
    active_since   timestamptz,
    fired_at       timestamptz,
    last_held      timestamptz,
    resolved_at    timestamptz,
    value          float8,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alert, key)
);

CREATE TABLE alert_events (
    id             bigserial   PRIMARY KEY,
    alert          text        NOT NULL,
    key            text        NOT NULL,
    labels         jsonb       NOT NULL,
    annotations    jsonb       NOT NULL,
    status         text        NOT NULL CHECK (status IN ('firing', 'resolved')),
    value          float8,
    since          timestamptz NOT NULL,
    at             timestamptz NOT NULL
);
CREATE INDEX alert_events_at ON alert_events (at);

CREATE TABLE rule_health (
    group_name      text        NOT NULL,
    alert           text        NOT NULL,
    health          text        NOT NULL CHECK (health IN ('ok', 'err')),
    last_error      text,
    last_evaluation timestamptz NOT NULL,
    evaluation_ms   float8      NOT NULL,
    PRIMARY KEY (group_name, alert)
);
