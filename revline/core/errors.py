"""One root error type. Exceptions are for bugs and infrastructure; bad input
is turned into data (dead-letter and exception records) at the edge."""


class RevlineError(Exception):
    """Root of every error Revline raises on purpose."""


class InfrastructureError(RevlineError):
    """A broker, database, ERP or tool we depend on is missing or not answering."""


class ConfigurationError(RevlineError):
    """Settings or config files are invalid; the message says what to change."""
