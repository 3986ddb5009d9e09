"""Shared state: token buckets (the rate limiter), failure windows and the alert throttle,
breakers (cooldowns and parks), in process or in Redis behind one interface."""
