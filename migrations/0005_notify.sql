-- Notifications: silences, aggregation groups, and the outbox every notification is written to
-- before it is sent.

-- The threshold an event was judged against (for messages), and whether the notifier has routed
-- it. Events recorded before notifications existed count as routed: nothing old is sent.
ALTER TABLE alert_events ADD COLUMN threshold float8,
    ADD COLUMN dispatched boolean NOT NULL DEFAULT false;
UPDATE alert_events SET dispatched = true;
CREATE INDEX alert_events_undispatched ON alert_events (id) WHERE NOT dispatched;

CREATE TABLE silences (
    id          bigserial   PRIMARY KEY,
    matchers    jsonb       NOT NULL,   -- ["name=value", "name=~regex", "name!=value", "name!~regex"]
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    created_by  text        NOT NULL,
    comment     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX silences_ends_at ON silences (ends_at);

-- One aggregation group per (receiver, group key): its alerts and when it is next sent.
CREATE TABLE notify_groups (
    receiver     text        NOT NULL,
    group_key    text        NOT NULL,
    state        jsonb       NOT NULL,
    flush_at     timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (receiver, group_key)
);

-- Every notification, written in the transaction that decided it, then delivered. A row is
-- marked delivered only after the receiver acknowledged it.
CREATE TABLE notify_outbox (
    id              bigserial   PRIMARY KEY,
    receiver        text        NOT NULL,
    target          text        NOT NULL,   -- the Alertmanager instance; '' for other receivers
    group_key       text        NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts        int         NOT NULL DEFAULT 0,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    last_error      text,
    delivered_at    timestamptz
);
CREATE INDEX notify_outbox_pending ON notify_outbox (receiver, target, id) WHERE status = 'pending';
