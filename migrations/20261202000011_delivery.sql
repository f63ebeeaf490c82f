-- Delivery channels: email over SMTP and signed webhooks.

-- Each user's email settings; a user without a row has no address and the
-- default kinds.
CREATE TABLE delivery_settings
(
    user_id     text PRIMARY KEY,
    email       text,
    email_kinds text[]      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Webhook endpoints, registered by admins. `events` empty: every event type,
-- including types added later.
CREATE TABLE webhook_endpoints
(
    id         uuid PRIMARY KEY,
    url        text        NOT NULL,
    events     text[]      NOT NULL,
    secret     text        NOT NULL,
    -- active, disabled (the receiver answered 410)
    status     text        NOT NULL DEFAULT 'active',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per message to send: an email to an address, or an event to a
-- webhook endpoint. The id is derived from the channel, the event and the
-- target, so recording a delivery twice (an intake message redelivered)
-- records it once. A row is the delivery's whole state: any instance claims
-- due rows (pushing `next_attempt_at` a lease ahead, so a claimer that dies
-- gives them back), sends, and records the outcome under its claim.
CREATE TABLE deliveries
(
    n                bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id               uuid PRIMARY KEY,
    -- email, webhook
    channel          text        NOT NULL,
    -- the address, or the endpoint's id
    target           text        NOT NULL,
    endpoint_id      uuid REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    -- the webhook event type, or the notification's kind
    event            text        NOT NULL,
    -- the same for every target of one event (webhook-id)
    message_id       text        NOT NULL,
    -- 0 personal, 1 bulk (announcements): lower goes first
    priority         smallint    NOT NULL,
    payload          jsonb       NOT NULL,
    -- pending, delivered, failed
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    last_status_code integer,
    last_error       text,
    next_attempt_at  timestamptz NOT NULL,
    claim            uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);

-- The claim reads one channel and one priority at a time: a bounded range
-- of this index, however many pending rows wait for later retries.
CREATE INDEX deliveries_due ON deliveries (channel, priority, next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_of_endpoint ON deliveries (endpoint_id, n DESC) WHERE endpoint_id IS NOT NULL;
CREATE INDEX deliveries_pending_by_channel ON deliveries (channel, created_at) WHERE status = 'pending';

-- The highest log seq each channel's intake has recorded deliveries for: a
-- consumer created again (its stream or itself deleted) starts after it, so
-- events already taken in are not taken in again.
CREATE TABLE delivery_intake
(
    channel text PRIMARY KEY,
    seq     bigint NOT NULL
);
