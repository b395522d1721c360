-- A wake that finds a partition's message in flight (claimed, no outcome
-- yet) marks the delivery; its postpone then makes it due at once instead
-- of after the hold (ADR 0012). A new claim clears the mark: that delivery
-- starts after the wake and sees whatever the wake announced.
ALTER TABLE mq_state ADD COLUMN woken TINYINT NOT NULL DEFAULT 0;
