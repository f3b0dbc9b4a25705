"""The ground floor: settings, errors, Kafka admin and readback, metrics,
the small helpers. Imports nothing of Revline outside ``revline.core``."""
